"""The running proxy's price book: config prices recorded at start, the book reloaded every minute."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from ...config import ModelPrice
from ...parse import CompletionRecord
from .book import RATE_FIELDS, PriceBook, PriceEntry
from .table import load_price_book, store_prices

log = logging.getLogger(__name__)


class Pricer:
    """Holds the proxy's price book: config prices recorded and the book loaded at start, then reloaded
    every `interval` seconds (prices synced by `chatledger prices sync` reach a running proxy)."""

    def __init__(self, engine: AsyncEngine, config_prices: Mapping[str, ModelPrice], interval: float = 60.0):
        self._engine = engine
        self._config_prices = dict(config_prices)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._config_recorded = False
        self.book = PriceBook(
            PriceEntry(model, datetime.min.replace(tzinfo=UTC), **{n: getattr(p, n) for n in RATE_FIELDS})
            for model, p in self._config_prices.items()
        )

    async def start(self, wait_seconds: float = 5.0) -> None:
        """Load prices, but never hold up the proxy's start for long: a slow database is retried later."""
        try:
            await asyncio.wait_for(self.refresh(), wait_seconds)
        except TimeoutError:
            log.warning("loading prices took over %.0fs; starting with the config's prices", wait_seconds)
        self._task = asyncio.create_task(self._run(), name="chatledger-prices")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        """Record config prices (once) and reload the book; on a database error keep the current book."""
        try:
            async with self._engine.begin() as conn:
                if not self._config_recorded:
                    new, changed = await store_prices(conn, self._config_prices, "config")
                    if new or changed:
                        log.info("recorded %d new and %d changed price(s) from the config", new, changed)
                    self._config_recorded = True
                self.book = await load_price_book(conn)
        except Exception as exc:
            log.warning(
                "could not load prices from the database (%s: %s); keeping %d known price(s)",
                type(exc).__name__,
                exc,
                len(self.book),
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.refresh(), self._interval)

    def apply(self, records: Sequence[CompletionRecord]) -> None:
        self.book.apply(records)
