"""Records that could go nowhere (neither the database nor the spool took them): counted, and logged as
errors at once and then at most every LOSS_LOG_INTERVAL, so a lasting outage cannot flood the log."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .errors import describe

log = logging.getLogger(__name__)

LOSS_LOG_INTERVAL = 10.0


class LossCounter:
    def __init__(self, spool_dir: Path) -> None:
        self._spool_dir = spool_dir
        self.total = 0
        self._unlogged = 0
        self._logged_at = -LOSS_LOG_INTERVAL

    def lose(self, count: int, exc: BaseException | None, *, log_now: bool = False) -> None:
        self.total += count
        self._unlogged += count
        now = time.monotonic()
        if log_now or now - self._logged_at >= LOSS_LOG_INTERVAL:
            self.log_now(exc)
            self._logged_at = now

    def log_now(self, exc: BaseException | None) -> None:
        if not self._unlogged:
            return
        log.error(
            "could not write %d record(s) to the database or the spool %s (%s); %d lost so far",
            self._unlogged,
            self._spool_dir,
            describe(exc) if exc is not None else "both unavailable, memory buffer full",
            self.total,
        )
        self._unlogged = 0
