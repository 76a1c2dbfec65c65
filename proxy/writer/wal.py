"""SQLite: the writer's WAL copied into the database file in the background.

SQLite checkpoints in the commit that crosses wal_autocheckpoint (10,000 pages here), so one of the
writer's commits every few seconds also copied ~40 MiB of WAL into the database file: in a ledger of ten
million rows such a commit took over 100 ms. A passive checkpoint on a connection of its own twice a
second keeps the WAL short, so the writer's commits rarely reach that point; it neither waits for nor
blocks the writer, readers or a prune.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from ..store.engine import passive_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 0.5  # seconds


class WalCheckpoints:
    """Runs passive checkpoints every `interval` seconds while started (SQLite only: elsewhere nothing)."""

    def __init__(self, engine: AsyncEngine, interval: float = CHECKPOINT_INTERVAL) -> None:
        self._engine = engine
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._engine.dialect.name == "sqlite" and self._task is None:
            self._task = asyncio.create_task(self._run(), name="chatledger-wal-checkpoints")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await passive_checkpoint(self._engine)
            except Exception as exc:  # the database down or its file gone: the writer reports those
                log.debug("background WAL checkpoint failed: %s", exc)
