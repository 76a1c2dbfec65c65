"""A shared-memory ring that carries a captured call's response bytes to the writer process.

Through the pipe, a 200-event stream (~60 KB) costs the serving process a pickle copy and a kernel copy
into the pipe. Through this ring it costs one memcpy into pages that stay mapped; the pipe carries only
(position, read lengths): a RingSlice in place of the Capture's reads.

The ring is a memfd the child inherits. The serving process writes each call's reads contiguously at
`head` (a position that only grows; its remainder modulo the capacity is the offset) and the child,
which takes calls in the order they were put, copies them out and then publishes how far it has read
(`consumed`, the first 8 bytes). A call that does not fit in the free space goes through the pipe as
before, so a writer that falls behind fills the pipe and trips RecorderLink's backlog check.
Linux only (os.memfd_create); elsewhere everything goes through the pipe.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple

from ..parse import Capture

CONSUMED = struct.Struct("<Q")  # at offset 0: how far the child has read (a head position)
DATA_START = 64  # the data region starts on its own cache line
RING_BYTES = 32 * 1024 * 1024
MIN_CALL_BYTES = 8 * 1024  # smaller responses go inline: copying them twice costs less than the bookkeeping



class RingSlice(NamedTuple):
    """Where a call's reads are in the ring, in place of the reads themselves."""

    head: int  # position of the first byte
    lengths: list[int]  # length of each read


class RingWriter:
    """The serving process's end: puts a call's reads in the ring, or says there is no room."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("chatledger-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self._capacity = size - DATA_START
        self._head = 0

    def put(self, reads: list[bytes], total: int) -> RingSlice | None:
        """Copy `reads` (`total` bytes in all) into the ring; None when they do not fit now."""
        capacity = self._capacity
        head = self._head
        offset = head % capacity
        if offset + total > capacity:  # a call is never split: skip the end of the ring
            head += capacity - offset
            offset = 0
        if head + total - CONSUMED.unpack_from(self._map, 0)[0] > capacity:
            return None
        position = DATA_START + offset
        # the joined reads in one assignment: fewer steps than one per read
        self._map[position : position + total] = reads[0] if len(reads) == 1 else b"".join(reads)
        self._head = head + total
        return RingSlice(head, [len(read) for read in reads])

    def read(self, where: RingSlice) -> list[bytes]:
        """Copies of reads put earlier (for calls a new child must get through the pipe: the ring
        goes with the child that had it)."""
        return _copy_out(self._map, DATA_START + where[0] % self._capacity, where[1])

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


def _copy_out(ring: mmap.mmap, position: int, lengths: list[int]) -> list[bytes]:
    reads = []
    for length in lengths:
        end = position + length
        reads.append(ring[position:end])
        position = end
    return reads


class RingReader:
    """The writer process's end: copies a call's reads out and frees their space."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, 0)
        os.close(fd)
        self._capacity = len(self._map) - DATA_START

    def take(self, where: RingSlice) -> list[bytes]:
        head, lengths = where
        reads = _copy_out(self._map, DATA_START + head % self._capacity, lengths)
        CONSUMED.pack_into(self._map, 0, head + sum(lengths))
        return reads

    def close(self) -> None:
        self._map.close()


def make_ring_writer() -> RingWriter | None:
    """A ring, or None where shared memory is not available (the pipe then carries everything)."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        return RingWriter(RING_BYTES)
    except OSError:
        return None


def in_ring(capture: Capture) -> bool:
    """Whether a captured call's reads are in the ring (a RingSlice in place of the list)."""
    return type(capture.chunks) is RingSlice


def via_ring(ring: RingWriter, capture: Capture) -> Capture:
    """The call with its response reads put in the ring, when they are big enough and fit."""
    reads = capture.chunks
    total = len(reads[0]) if len(reads) == 1 else sum(map(len, reads))
    if total < MIN_CALL_BYTES:
        return capture
    where = ring.put(reads, total)
    return capture if where is None else capture._replace(chunks=where)
