"""The copy of a response kept for the writer while its bytes go to the client.

Bounded by MAX_PARSED_BODY: a body past the bound is dropped (nothing whole to parse); an event stream
past it keeps its first STREAM_HEAD_BYTES and a rolling last STREAM_TAIL_BYTES, where identity, finish
and usage are.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from ..parse.decoders import MAX_PARSED_BODY
from ..parse.stream_tap import StreamTap

STREAM_HEAD_BYTES = 64 * 1024
STREAM_TAIL_BYTES = 1024 * 1024


@dataclass(slots=True)
class ResponseCopy:
    """A response's reads (and, for an event stream, their arrival times). A tap like StreamTap
    (feed/close), except that it never holds bytes back from the client."""

    times: list[float] | None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    overflow: bool = False
    gap_at: int = -1  # an overflowed stream: chunks[gap_at:] (the tail) follows a gap
    tail: collections.deque[tuple[bytes, float]] | None = None  # made at the gap: most calls never have one
    tail_size: int = 0

    def feed(self, chunk: bytes, now: float) -> bytes:
        if not self.overflow:
            self.size += len(chunk)
            if self.size <= MAX_PARSED_BODY:
                self.chunks.append(chunk)
                if self.times is not None:
                    self.times.append(now)
                return chunk
            self.overflow = True
            if self.times is None:
                self.chunks.clear()
                return chunk
            self._keep_head()
        if self.tail is not None:
            self.tail.append((chunk, now))
            self.tail_size += len(chunk)
            while self.tail_size > STREAM_TAIL_BYTES and len(self.tail) > 1:
                self.tail_size -= len(self.tail.popleft()[0])
        return chunk

    def _keep_head(self) -> None:
        assert self.times is not None
        kept = size = 0
        while kept < len(self.chunks) and size < STREAM_HEAD_BYTES:
            size += len(self.chunks[kept])
            kept += 1
        del self.chunks[kept:], self.times[kept:]
        self.gap_at = kept
        self.tail = collections.deque()

    def reads(self) -> tuple[list[bytes], list[float] | None]:
        """The reads kept, and their times: the tail of an overflowed stream after its head."""
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

