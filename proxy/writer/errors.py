"""Telling database failures apart: the rows were refused (data), or the database is unreachable."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from sqlalchemy import exc as sa_exc

DATA_SQLSTATE_CLASSES = frozenset({"22", "23"})  # data exception, integrity constraint violation


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 10:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__


def is_data_error(exc: BaseException) -> bool:
    """True when the database refused the rows themselves, not the connection: retrying the same
    rows cannot help, but the database is up."""
    for cause in _causes(exc):
        if isinstance(cause, sa_exc.IntegrityError | sa_exc.DataError | sqlite3.IntegrityError | sqlite3.DataError):
            return True  # (sqlite3's own: the batch writer runs its statements on the driver directly)
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in DATA_SQLSTATE_CLASSES:
            return True
        if isinstance(cause, UnicodeError | OverflowError | ValueError | TypeError):
            return True  # a value the driver cannot send (asyncpg's DataError is a ValueError)
        if type(cause).__module__ == "sqlite3" and "binding parameter" in str(cause):
            return True  # sqlite3: a value of an unsupported type
    return False


def describe(exc: BaseException) -> str:
    """A one-line reason without the SQL text and parameters SQLAlchemy appends."""
    cause = exc
    for cause in _causes(exc):  # noqa: B007 - the innermost cause names the real problem
        pass
    first_line = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first_line}"[:300].rstrip(": ")


