"""What the serving process and its writer process say to each other, and how it is framed on the pipes.

Frames are a 4-byte big-endian length and a pickle of one message. The child speaks only to its parent,
and captured calls carry a key fingerprint, never the key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import pickle
import struct
from typing import Any, NamedTuple

from ..config import Config
from ..parse import Capture, CompletionRecord
from .protocol import WriterStats
from .summary import BatchSummary

HEADER = struct.Struct(">I")
PIPE_BYTES = 1024 * 1024  # Linux's default pipe-max-size


# parent -> child
class Start(NamedTuple):
    config: Config
    ring_fd: int | None  # the shared-memory ring (ring.py) the child inherits, if any


class Items(NamedTuple):
    items: list[Capture | CompletionRecord]


class IdleRequest(NamedTuple):
    token: int


class Close(NamedTuple):
    drain: float = 30.0  # seconds the child may spend writing to the database before it spools the rest


# child -> parent
class Ready(NamedTuple):
    pass


class StatsReport(NamedTuple):
    stats: WriterStats
    received: int  # items taken from the parent so far: what a crash of the child would lose is the rest
    summary: BatchSummary | None  # the metrics of the batches written since the last report


class IdleReply(NamedTuple):
    token: int


def frame(message: Any) -> list[bytes]:
    """A message as (length header, pickle), for writelines: a frame of stream captures runs to
    megabytes, and uvloop's pipes write the two without joining them (asyncio's join them)."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return [HEADER.pack(len(payload)), payload]


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at end of stream."""
    try:
        header = await reader.readexactly(HEADER.size)
        payload = await reader.readexactly(HEADER.unpack(header)[0])
    except asyncio.IncompleteReadError:
        return None
    return pickle.loads(payload)


class FrameReader(asyncio.Protocol):
    """The child's stdin: frames unpickled straight from the bytes received. asyncio's StreamReader
    copies each frame once more and wakes its reader for every pipe read of a large frame."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._frames: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        with memoryview(buffer) as view:
            while len(buffer) - start >= HEADER.size:
                (size,) = HEADER.unpack_from(view, start)
                end = start + HEADER.size + size
                if end > len(buffer):
                    break
                self._frames.append(pickle.loads(view[start + HEADER.size : end]))
                start = end
        if start:
            del buffer[:start]
            self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof_received()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Any:
        """The next message, or None at end of stream."""
        while not self._frames:
            if self._eof:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._frames.popleft()


def widen_pipe(stream: asyncio.StreamWriter | None) -> None:
    """Grow the pipe to the child from 64 KiB: a streamed call's frame is often bigger, and a wider pipe
    takes it in one write() instead of a partial write, a wait for the child and a second write."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    pipe = stream.transport.get_extra_info("pipe") if stream is not None else None
    if set_size is None or pipe is None:
        return
    with contextlib.suppress(OSError):  # the limit (/proc/sys/fs/pipe-max-size) may be lower
        fcntl.fcntl(pipe.fileno(), set_size, PIPE_BYTES)
