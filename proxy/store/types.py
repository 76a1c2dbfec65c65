"""Column types of the ledger, and the one place values are converted for the database.

SQLAlchemy calls `process_bind_param` / `process_result_value` on the ORM and Core paths. The batch
insert (insert.py) hands parameters to the driver directly, so each type also names its driver-level
converter (`driver_converter`), and how a value that went through JSON (the spool) comes back
(`json_converter`). rows.py derives every column's converters from these; nothing else converts.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import JSON, Boolean, DateTime, Numeric
from sqlalchemy.types import TypeDecorator, TypeEngine

COST_SCALE = 12

Converter = Callable[[Any], Any]


def sqlite_time(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME text, `YYYY-MM-DD HH:MM:SS.ffffff` in UTC. Records carry UTC times:
    isoformat() without its "+00:00" is half the cost of dropping the zone and calling str()."""
    if value.tzinfo is UTC:
        text = value.isoformat(" ")[:-6]
        return text if value.microsecond else text + ".000000"
    if value.tzinfo is not None:
        if value.utcoffset():
            value = value.astimezone(UTC)
        value = value.replace(tzinfo=None)
    text = str(value)
    return text if value.microsecond else text + ".000000"


def postgres_time(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def as_decimal(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


def json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC; SQLite hands back naive values, which are UTC by construction."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Money(TypeDecorator[Decimal]):
    """USD amounts as exact decimals.

    PostgreSQL stores NUMERIC(24, 12) exactly. SQLite has no decimal type: the value is stored as a
    REAL (so SUM and ORDER BY work in plain SQL) and read back rounded to 12 decimal places, which is
    exact for amounts with up to 15 significant digits.
    """

    impl = Numeric(24, COST_SCALE, asdecimal=False)
    cache_ok = True

    def process_bind_param(self, value: Decimal | float | None, dialect: Any) -> Any:
        if value is None:
            return None
        return float(value) if dialect.name == "sqlite" else as_decimal(value)

    def process_result_value(self, value: Any, dialect: Any) -> Decimal | None:
        if value is None:
            return None
        if isinstance(value, Decimal):
            return value.quantize(Decimal(1)) if value == value.to_integral() else value.normalize()
        return Decimal(str(round(float(value), COST_SCALE)))


def driver_converter(kind: TypeEngine[Any], dialect: str) -> Converter | None:
    """How a non-NULL value of this type goes to the driver, as SQLAlchemy would bind it; None: as it is."""
    sqlite = dialect == "sqlite"
    if isinstance(kind, UTCDateTime):
        return sqlite_time if sqlite else postgres_time
    if isinstance(kind, Money):
        return float if sqlite else as_decimal
    if isinstance(kind, JSON):
        return json_text
    if isinstance(kind, Boolean) and sqlite:
        return int
    return None


def json_converter(kind: TypeEngine[Any]) -> Converter | None:
    """How a value of this type that went through JSON (the spool) is read back; None: as it is."""
    if isinstance(kind, UTCDateTime):
        return datetime.fromisoformat
    if isinstance(kind, Money):
        return as_decimal
    return None
