"""Failed logins, counted per client address: past a few wrong tokens a minute, the form answers 429.

A guessed token is the only way into the dashboard from outside, so guessing is made slow. The table
of addresses is bounded: a flood of addresses evicts the oldest entries instead of growing memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

MAX_FAILURES = 10  # wrong tokens per address per window
WINDOW_SECONDS = 60.0
MAX_ADDRESSES = 4096


@dataclass(slots=True)
class _Window:
    started: float
    failures: int


class LoginThrottle:
    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window: float = WINDOW_SECONDS,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_failures = max_failures
        self._window = window
        self._max_addresses = max_addresses
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def retry_after(self, address: str) -> int:
        """Seconds until this address may try again; 0 when it may now."""
        entry = self._windows.get(address)
        if entry is None:
            return 0
        left = entry.started + self._window - self._clock()
        if left <= 0:
            del self._windows[address]
            return 0
        return int(left) + 1 if entry.failures >= self._max_failures else 0

    def failed(self, address: str) -> None:
        now = self._clock()
        entry = self._windows.get(address)
        if entry is None or now - entry.started >= self._window:
            self._windows.pop(address, None)
            while len(self._windows) >= self._max_addresses:
                self._windows.popitem(last=False)
            self._windows[address] = _Window(now, 1)
        else:
            entry.failures += 1

    def succeeded(self, address: str) -> None:
        self._windows.pop(address, None)


def client_address(request: web.Request) -> str:
    return request.remote or "?"


THROTTLE = web.AppKey("login_throttle", LoginThrottle)
