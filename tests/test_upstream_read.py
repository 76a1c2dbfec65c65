"""read_available: an upstream body read in one step per batch of HTTP chunks, through a real socket and
aiohttp's real client, with flow control (pause and resume) and errors behaving as readany()'s."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.relay.aiohttp_compat import can_drain, read_available

from .helpers import raw_upstream

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def framed(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)


async def _read_all(url: str, pause: float = 0.0) -> tuple[list[bytes], bool]:
    """Every read_available() result until the end of the body, and whether the fast path applied."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        if pause:
            await asyncio.sleep(pause)  # let the whole body land in the reader's buffer first
        reads = []
        while chunk := await asyncio.wait_for(read_available(response.content), 10):
            reads.append(chunk)
        return reads, can_drain(response.content)


EVENTS = [b'data: {"n":%d,"delta":{"content":"word"}}\n\n' % n for n in range(50)]


async def test_one_call_takes_every_chunk_already_buffered() -> None:
    def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + framed(EVENTS) + b"0\r\n\r\n")  # 50 HTTP chunks in one write

    async with raw_upstream(respond) as (url, _):
        reads, fast = await _read_all(url, pause=0.2)
    assert fast, "aiohttp's StreamReader no longer has the internals read_available drains in one step"
    assert b"".join(reads) == b"".join(EVENTS)
    assert len(reads) == 1, f"expected the 50 buffered chunks in one read, got {len(reads)}"


async def test_a_body_over_the_buffer_limits_pauses_and_resumes_reading() -> None:
    """8 MiB in 1 KiB HTTP chunks: the reader pauses the transport (over its size and chunk-count high
    water marks) and must resume it after a one-step drain, or the read hangs."""
    pieces = [bytes([65 + n % 26]) * 1024 for n in range(8192)]

    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        for start in range(0, len(pieces), 256):
            writer.write(framed(pieces[start : start + 256]))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async with raw_upstream(respond) as (url, _):
        reads, _ = await _read_all(url, pause=0.2)
    assert b"".join(reads) == b"".join(pieces)
    assert max(len(read) for read in reads) > 1024  # some reads took several chunks at once


async def test_a_cut_off_body_raises_as_readany_does() -> None:
    def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + framed(EVENTS[:10]))  # no last chunk: the connection closes mid-body

    async with raw_upstream(respond) as (url, _):
        with pytest.raises(aiohttp.ClientPayloadError):
            await _read_all(url, pause=0.2)


async def test_reads_that_arrive_one_by_one_are_returned_as_they_come() -> None:
    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        for event in EVENTS[:5]:
            writer.write(framed([event]))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")

    async with raw_upstream(respond) as (url, _):
        reads, _ = await _read_all(url)
    assert reads == EVENTS[:5]


async def test_a_bodiless_response_reads_as_empty() -> None:
    def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    async with raw_upstream(respond) as (url, _):
        reads, fast = await _read_all(url)
    assert reads == []
    assert not fast  # aiohttp's EmptyStreamReader: read through readany()
