"""Typed SQLAlchemy models of the ledger and the engine factory.

Table and column names are a public interface (users query them with plain SQL): keep them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BigIntPK = BigInteger().with_variant(Integer, "sqlite")
COST_SCALE = 12


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
        if dialect.name == "sqlite":
            return float(value)
        return Decimal(value) if not isinstance(value, Decimal) else value

    def process_result_value(self, value: Any, dialect: Any) -> Decimal | None:
        if value is None:
            return None
        if isinstance(value, Decimal):
            return value.quantize(Decimal(1)) if value == value.to_integral() else value.normalize()
        return Decimal(str(round(float(value), COST_SCALE)))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Completion(Base):
    """One proxied call (a chat completion, or any call when logging.all_paths is on)."""

    __tablename__ = "completions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    upstream: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32), index=True)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    requested_model: Mapped[str | None] = mapped_column(Text)
    completion_id: Mapped[str | None] = mapped_column(Text, index=True)
    object: Mapped[str | None] = mapped_column(Text)
    created: Mapped[int | None] = mapped_column(BigInteger)
    model: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(Text)
    system_fingerprint: Mapped[str | None] = mapped_column(Text)
    service_tier: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(BigInteger)
    completion_tokens: Mapped[int | None] = mapped_column(BigInteger)
    total_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cached_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cache_write_tokens: Mapped[int | None] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cost: Mapped[Decimal | None] = mapped_column(Money)
    cost_source: Mapped[str | None] = mapped_column(String(16))
    usage: Mapped[Any | None] = mapped_column(JSON(none_as_null=True))
    api_key_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    user: Mapped[str | None] = mapped_column(Text, index=True)
    tags: Mapped[Any | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[str | None] = mapped_column(Text)
    upstream_request_id: Mapped[str | None] = mapped_column(Text)

    choices: Mapped[list[CompletionChoice]] = relationship(
        back_populates="completion", order_by="CompletionChoice.index", lazy="raise"
    )

    __table_args__ = (
        Index("ix_completions_model_started_at", "model", "started_at"),
        Index("ix_completions_requested_model", "requested_model"),
        Index(  # migration 0003: stats --by model reads this index only; new rows append to their model's range
            "ix_completions_model_stats", "model", "requested_model", "started_at", "duration_ms", "outcome",
            "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "cost",
        ),
    )


class CompletionChoice(Base):
    """One choice of a completion (n>1 gives several); finish reasons are what audits filter on."""

    __tablename__ = "completion_choices"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    completion_pk: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("completions.id", ondelete="CASCADE"), index=True
    )
    index: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(Text)
    native_finish_reason: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str | None] = mapped_column(Text)

    completion: Mapped[Completion] = relationship(back_populates="choices")


class Price(Base):
    """A model's price from `effective_from` on, in USD per million tokens (history is kept)."""

    __tablename__ = "prices"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(Text)
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime)
    prompt: Mapped[Decimal] = mapped_column(Money)
    completion: Mapped[Decimal] = mapped_column(Money)
    cache_read: Mapped[Decimal | None] = mapped_column(Money)
    cache_write: Mapped[Decimal | None] = mapped_column(Money)
    reasoning: Mapped[Decimal | None] = mapped_column(Money)
    source: Mapped[str] = mapped_column(String(32))

    __table_args__ = (UniqueConstraint("model", "effective_from", "source"),)


class ApiKey(Base):
    """A human label for a key fingerprint; the key itself is never stored."""

    __tablename__ = "api_keys"

    api_key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


completions_table = Completion.__table__
choices_table = CompletionChoice.__table__


WAL_AUTOCHECKPOINT_PAGES = 10_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA cache_size=-32768")  # 32 MiB (8x SQLite's default); 256 MiB measured no faster
    cursor.execute("PRAGMA foreign_keys=ON")
    # Checkpoint at 10,000 WAL pages (~40 MiB), not 1,000: completion ids are random, so each row dirties a
    # page of their index, and a page dirtied by several commits is then copied to the database file once.
    # Writer into a 1M-row ledger: 14.6k -> 16.6k rows/s (40,000 pages: 19.8k, for a 160 MiB WAL file).
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cursor.close()


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine; SQLite gets WAL, a busy timeout (several writers coexist) and foreign keys."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)
