"""The writer's retention task: with `[retention] days` set, deletes calls older than that many days once
per `[retention] interval`, in the background (store.retention.prune, one short batch at a time).

Several writers may share a ledger (serving processes, hosts on one PostgreSQL): each checks every
interval, and the one that moves ledger_meta 'retention_run_at' forward (an atomic conditional UPDATE,
or the INSERT that creates it) runs the prune; the others find it done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from ..config import RetentionConfig
from ..logs import RateLimited
from ..store.retention import cut_for_days, insert_ignore, meta, prune
from .errors import describe

log = logging.getLogger(__name__)

RUN_AT = "retention_run_at"
START_DELAY = 60.0  # the first check (or after one interval, if shorter) lets the start settle (replay)
STOP_GRACE = 10.0  # how long stop() lets a batch in progress finish


def stamp(moment: datetime) -> str:
    """One fixed ISO format (microseconds always present), so the strings sort as the times do."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


async def claim(engine: AsyncEngine, interval: float, now: datetime | None = None) -> bool:
    """Take this interval's run: True for exactly one of the writers checking at the same time."""
    now = now or datetime.now(UTC)
    async with engine.begin() as conn:
        created = await conn.execute(insert_ignore(conn.dialect.name).values(key=RUN_AT, value=stamp(now)))
        if created.rowcount:
            return True
        due = stamp(now - timedelta(seconds=interval))
        moved = await conn.execute(
            update(meta).where(meta.c.key == RUN_AT, meta.c.value <= due).values(value=stamp(now))
        )
        return bool(moved.rowcount)


class Retention:
    """The background task; start() and stop() bracket the writer's life."""

    def __init__(self, engine: AsyncEngine, config: RetentionConfig) -> None:
        self._engine = engine
        self._config = config
        self._start_delay = min(START_DELAY, config.interval)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = RateLimited(log, burst=1, period=3600.0)
        self.runs = 0  # prunes this writer ran

    async def start(self) -> None:
        if self._config.days > 0:
            self._task = asyncio.create_task(self._run(), name="chatledger-retention")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stop.set()  # a batch in progress ends first: a cancelled SQLite statement can keep the lock
        done, _ = await asyncio.wait({self._task}, timeout=STOP_GRACE)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        # writers started together (--workers) check at slightly different times
        wait = self._start_delay * (1 + random.random() / 4)
        while not await self._stopped_within(wait):
            try:
                await self.run_once()
            except Exception as exc:
                self._failures.log(logging.WARNING, "retention: pruning failed, retried in %.0f s: %s",
                                   self._config.interval, describe(exc))
            wait = self._config.interval

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def run_once(self) -> bool:
        """Prune if this writer claims the interval; True when it ran."""
        if not await claim(self._engine, self._config.interval):
            return False
        self.runs += 1
        report = await prune(self._engine, cut_for_days(self._config.days), stop=self._stop)
        if report.rows:
            log.info(
                "retention: deleted %d call(s) before %s in %d batch(es) (longest %.0f ms, %.1f s)",
                report.rows, report.cut.date().isoformat(), report.batches, report.longest_batch_ms, report.seconds,
            )
        return True
