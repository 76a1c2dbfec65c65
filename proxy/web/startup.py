"""The database at start: migrated before serving when it answers, otherwise in the background.

A deploy during a database outage must not take the proxy down: the first attempt is bounded by
FIRST_ATTEMPT seconds, and after a failure the proxy serves anyway (the writer spools every call and
replays once the database takes writes) while the migration is retried with a doubling backoff. Health
reports `degraded` with the reason until the migration has run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from ..store.migrate import upgrade
from ..writer.errors import describe

log = logging.getLogger("chatledger")

FIRST_ATTEMPT = 10.0
ATTEMPT_TIMEOUT = 30.0
RETRY_INITIAL = 1.0
RETRY_MAX = 30.0


class DatabaseStartup:
    """Runs the migration (or only records success when the caller migrated already)."""

    def __init__(self, engine: AsyncEngine, *, migrate: bool) -> None:
        self._engine = engine
        self._migrate = migrate
        self.migrated = not migrate
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.migrated:
            return
        if await self._attempt(FIRST_ATTEMPT):
            return
        log.warning(
            "database unavailable at start (%s): serving anyway; calls are spooled and the migration is retried "
            "in the background",
            self.last_error,
        )
        self._task = asyncio.create_task(self._retry(), name="chatledger-migrate")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _attempt(self, timeout: float) -> bool:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                await upgrade(self._engine)
        except Exception as exc:
            self.last_error = describe(exc) if not isinstance(exc, TimeoutError) else f"no answer in {timeout:g}s"
            return False
        self.migrated, self.last_error = True, None
        return True

    async def _retry(self) -> None:
        delay = RETRY_INITIAL
        while True:
            await asyncio.sleep(delay)
            if await self._attempt(ATTEMPT_TIMEOUT):
                log.warning("database answers again: migrated; spooled calls are replayed")
                return
            delay = min(delay * 2, RETRY_MAX)
