"""A resource the writer depends on that fails and comes back (the database, the spool disk)."""

from __future__ import annotations

import time
from dataclasses import dataclass

RETRY_INITIAL = 0.5
RETRY_MAX = 10.0


@dataclass(slots=True)
class Health:
    """A resource that fails and comes back (the database, the spool): retried with a doubling backoff."""

    ok: bool = True
    retry_at: float = 0.0
    delay: float = RETRY_INITIAL

    def usable(self) -> bool:
        return self.ok or time.monotonic() >= self.retry_at

    def failed(self) -> None:
        self.ok = False
        self.retry_at = time.monotonic() + self.delay
        self.delay = min(self.delay * 2, RETRY_MAX)

    def back(self) -> None:
        self.ok = True
        self.delay = RETRY_INITIAL
