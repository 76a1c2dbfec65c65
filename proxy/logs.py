"""Logging set-up shared by every process (levels, third-party loggers), rate-limited warnings, and the
access log line.

Every value that reaches a log line from a request or a response is hostile: `printable` escapes it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import LoggingConfig
    from .parse.record import CompletionRecord

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# chatty at debug (aiosqlite logs every call it runs): kept at [logging] library_level
LIBRARY_LOGGERS = ("aiosqlite", "asyncio", "sqlalchemy", "alembic", "aiohttp", "asyncpg", "urllib3")
ACCESS = logging.getLogger("chatledger.access")


def configure(config: LoggingConfig) -> None:
    """The process's logging: chatledger's loggers at [logging] level, libraries at library_level."""
    logging.basicConfig(level=config.level.upper(), stream=sys.stderr, format=FORMAT)
    library = logging.getLevelName(config.library_level.upper())
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library)


_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def printable(value: object, limit: int = 200) -> str:
    """A value as it may appear in a log line: control characters escaped (no forged lines, no terminal
    escapes), cut to `limit` characters."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.translate(_ESCAPES) if not text.isprintable() else text


class RateLimited:
    """At most `burst` lines per `period` seconds from one source; the next line says how many were
    left out. Logging never floods: a client that sends garbage, or an upstream down under load, costs
    a few lines a minute."""

    __slots__ = ("_burst", "_logger", "_period", "_sent", "_skipped", "_window")

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 60.0) -> None:
        self._logger = logger
        self._burst = burst
        self._period = period
        self._window = -period
        self._sent = 0
        self._skipped = 0

    def log(self, level: int, message: str, *args: object) -> bool:
        """Log the line unless the burst of this period is used; True when it was logged."""
        now = time.monotonic()
        if now - self._window >= self._period:
            self._window, self._sent = now, 0
        if self._sent >= self._burst:
            self._skipped += 1
            return False
        self._sent += 1
        if self._skipped:
            message += " (%d more like it not logged)"
            args = (*args, self._skipped)
            self._skipped = 0
        self._logger.log(level, message, *args)
        return True


def access_line(record: CompletionRecord) -> str:
    """One call as the access log shows it: method, path (credentials redacted), status, outcome, model,
    tokens (prompt+completion), duration and request id."""
    model = record.model or record.requested_model
    tokens = (
        f"{record.prompt_tokens if record.prompt_tokens is not None else '-'}"
        f"+{record.completion_tokens if record.completion_tokens is not None else '-'}"
    )
    duration = f"{record.duration_ms:.1f}ms" if record.duration_ms is not None else "-"
    return (
        f"{printable(record.method, 16)} {printable(record.path, 300)} "
        f"{record.status_code if record.status_code is not None else '-'} {record.outcome} "
        f"model={printable(model, 100) if model else '-'} tokens={tokens} {duration} id={record.request_id}"
    )


def log_access(records: list[CompletionRecord]) -> None:
    """The access log lines of a batch of records (the writer calls it once per batch)."""
    if ACCESS.isEnabledFor(logging.INFO):
        for record in records:
            ACCESS.info("%s", access_line(record))
