"""The shared-memory ring between the serving process and its writer process (proxy/ring.py), both
ends in one process: what goes in comes out, in order, across the ring's end, and a full ring says so."""

from __future__ import annotations

import os
import random

import pytest

from proxy.writer.ring import DATA_START, RingReader, RingWriter

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the ring needs os.memfd_create (Linux)")


def _pair(capacity: int) -> tuple[RingWriter, RingReader]:
    writer = RingWriter(DATA_START + capacity)
    return writer, RingReader(os.dup(writer.fd))


def test_reads_come_out_as_they_went_in_across_the_end_of_the_ring() -> None:
    writer, reader = _pair(10_000)
    rng = random.Random(7)
    try:
        for n in range(500):
            reads = [rng.randbytes(rng.randint(0, 900)) for _ in range(rng.randint(1, 8))]
            where = writer.put(reads, sum(map(len, reads)))
            assert where is not None, n  # taken at once: there is always room
            assert reader.take(where) == reads
    finally:
        writer.close()
        reader.close()


def test_a_full_ring_refuses_a_call_until_the_reader_frees_space() -> None:
    writer, reader = _pair(10_000)
    try:
        first = writer.put([b"a" * 4000, b"b" * 2000], 6000)
        second = writer.put([b"c" * 3000], 3000)
        assert first is not None
        assert second is not None
        assert writer.put([b"d" * 2000], 2000) is None  # 9,000 of 10,000 bytes in use
        assert reader.take(first) == [b"a" * 4000, b"b" * 2000]
        third = writer.put([b"d" * 2000], 2000)  # does not fit before the end: starts over at 0
        assert third is not None
        assert third[0] == 10_000
        assert writer.put([b"e" * 7000], 7000) is None  # the second call still holds 6,000..9,000
        assert reader.take(second) == [b"c" * 3000]
        assert reader.take(third) == [b"d" * 2000]
        assert writer.put([b"e" * 7000], 7000) is not None
        assert writer.put([b"f" * 10_001], 10_001) is None  # bigger than the ring: never fits
    finally:
        writer.close()
        reader.close()
