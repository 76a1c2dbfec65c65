"""The copy of a response kept for the writer while its bytes go to the client.

Bounded per response by MAX_PARSED_BODY, and across the process by a CopyBudget
(`server.copy_budget_mb`): a body past either bound is dropped (nothing whole to parse); an event stream
past it keeps its first STREAM_HEAD_BYTES and a rolling last STREAM_TAIL_BYTES, where identity, finish
and usage are. Every copy may keep its first STREAM_HEAD_BYTES whatever the budget says.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from ..parse.decoders import MAX_PARSED_BODY
from ..parse.stream_tap import StreamTap

STREAM_HEAD_BYTES = 64 * 1024
STREAM_TAIL_BYTES = 1024 * 1024
TRIM_AFTER = 16 * 1024 * 1024  # a burst of copies this large is handed back to the system once it is over
TRIM_DELAY = 1.0
BUDGET_NOTE = "response not kept whole: the proxy's copy budget (server.copy_budget_mb) was in use"


class CopyBudget:
    """The bytes all response copies of this process hold, against a limit. After a burst (a peak over
    TRIM_AFTER), once the copies are down to a quarter of it, `trim` runs (runtime.release_free_memory):
    the allocator keeps freed memory otherwise, and the process would stay at its peak."""

    __slots__ = ("_peak", "_trim", "_trim_handle", "limit", "used")

    def __init__(self, limit: int, trim: Callable[[], object] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self._peak = 0
        self._trim = trim
        self._trim_handle: asyncio.TimerHandle | None = None

    def release(self, size: int) -> None:
        if self.used > self._peak:
            self._peak = self.used  # noted here: once per call, not per read
        self.used -= size
        if self._peak > TRIM_AFTER and self.used < self._peak // 4 and self._trim_handle is None:
            self._trim_handle = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim_now)

    def note_peak(self) -> None:
        if self.used > self._peak:
            self._peak = self.used

    def _trim_now(self) -> None:
        self._trim_handle = None
        self._peak = self.used
        if self._trim is not None:
            self._trim()


@dataclass(slots=True)
class ResponseCopy:
    """A response's reads (and, for an event stream, their arrival times). A tap like StreamTap
    (feed/close), except that it never holds bytes back from the client."""

    times: list[float] | None
    budget: CopyBudget | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    overflow: bool = False
    over_budget: bool = False  # the overflow came from the process's budget, not this response's size
    gap_at: int = -1  # an overflowed stream: chunks[gap_at:] (the tail) follows a gap
    tail: collections.deque[tuple[bytes, float]] | None = None  # made at the gap: most calls never have one
    tail_size: int = 0
    charged: int = 0  # bytes counted in the budget

    def feed(self, chunk: bytes, now: float) -> bytes:
        if not self.overflow:
            self.size += len(chunk)
            budget = self.budget
            if self.size <= MAX_PARSED_BODY and (
                budget is None or budget.used < budget.limit or self.size <= STREAM_HEAD_BYTES
            ):
                self.chunks.append(chunk)
                if budget is not None:
                    budget.used += len(chunk)
                    self.charged += len(chunk)
                if self.times is not None:
                    self.times.append(now)
                return chunk
            self.overflow = True
            self.over_budget = self.size <= MAX_PARSED_BODY
            if budget is not None:
                budget.note_peak()
            if self.times is None:
                self.chunks.clear()
                self._charge(-self.charged)
                return chunk
            self._keep_head()
        if self.tail is not None:
            self.tail.append((chunk, now))
            self.tail_size += len(chunk)
            freed = 0
            while self.tail_size > STREAM_TAIL_BYTES and len(self.tail) > 1:
                dropped = len(self.tail.popleft()[0])
                self.tail_size -= dropped
                freed += dropped
            self._charge(len(chunk) - freed)
        return chunk

    def _charge(self, size: int) -> None:
        if self.budget is not None:
            self.budget.used += size
            self.charged += size

    def _keep_head(self) -> None:
        assert self.times is not None
        kept = size = 0
        while kept < len(self.chunks) and size < STREAM_HEAD_BYTES:
            size += len(self.chunks[kept])
            kept += 1
        self._charge(size - sum(map(len, self.chunks)))
        del self.chunks[kept:], self.times[kept:]
        self.gap_at = kept
        self.tail = collections.deque()

    def release(self) -> None:
        """The copy is handed over (or given up): its bytes leave the budget. Idempotent."""
        if self.budget is not None and self.charged:
            self.budget.release(self.charged)
            self.charged = 0

    def reads(self) -> tuple[list[bytes], list[float] | None]:
        """The reads kept, and their times: the tail of an overflowed stream after its head. Releases
        the copy's bytes from the budget: from here on they belong to the writer's hand-off."""
        self.release()
        if self.tail is None:
            return self.chunks, self.times
        assert self.times is not None  # only an event stream keeps a tail
        return self.chunks + [c for c, _ in self.tail], self.times + [t for _, t in self.tail]

    def close(self, now: float, complete: bool = True) -> bytes:
        return b""


@dataclass(slots=True)
class StrippedCopy:
    """A raw copy for the writer, while the client's bytes go through a strip-only StreamTap that cuts
    the usage chunk the proxy asked for. The tap folds only until it knows the stream's shape; the
    writer folds the whole stream, usage chunk included, from the copy."""

    copy: ResponseCopy
    strip: StreamTap

    def feed(self, chunk: bytes, now: float) -> bytes:
        self.copy.feed(chunk, now)
        return self.strip.feed(chunk, now)

    def close(self, now: float, complete: bool = True) -> bytes:
        return self.strip.close(now, complete)

