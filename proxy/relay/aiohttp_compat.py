"""The one place chatledger relies on aiohttp internals (tests/test_upstream_read.py pins them).

- `read_available`: an upstream response body read everything-that-has-arrived in one step.
- `WholeBodyResponse`: a response whose headers go out with its body in one write.

aiohttp's client keeps a chunked body as one buffer entry per HTTP chunk, and `readany()` takes them
one at a time: per entry it updates its counters and calls the protocol's `resume_reading()`, which
feeds the parser again and resumes the transport. A streamed completion sends one HTTP chunk per SSE
event, and a socket read under load holds ten or more of them: that per-chunk work dominated the
request path's CPU per streamed call. `read_available` takes every buffered
entry at once, with the same bookkeeping done once, and falls back to `readany()` for anything else
(one entry, nothing buffered yet, an error, a partly read entry, a StreamReader without the
attributes this relies on).
"""

from __future__ import annotations

from aiohttp import StreamReader, web

# The StreamReader internals the one-step drain updates; checked once per class (tests/test_upstream_read.py
# fails when an aiohttp release renames them, so the fallback is never silently the only path).
_DRAIN_ATTRIBUTES = (
    "_buffer",
    "_buffer_offset",
    "_size",
    "_cursor",
    "_http_chunk_splits",
    "_low_water",
    "_low_water_chunks",
    "_protocol",
    "_timer",
    "_exception",
)
_drainable: dict[type, bool] = {}


def can_drain(content: StreamReader) -> bool:
    """Whether this reader has the internals read_available's one-step path relies on."""
    kind = type(content)
    known = _drainable.get(kind)
    if known is None:
        known = _drainable[kind] = all(hasattr(content, name) for name in _DRAIN_ATTRIBUTES)
    return known


async def read_available(content: StreamReader) -> bytes:
    """What `content.readany()` returns over as many calls as there are buffered entries, in one call:
    all the bytes buffered now, or the next bytes to arrive, or b"" at the end of the body."""
    if not can_drain(content):  # e.g. the EmptyStreamReader of a bodiless response
        return await content.readany()
    buffer = content._buffer
    if len(buffer) < 2 or content._buffer_offset or content._exception is not None:
        return await content.readany()
    content._timer.assert_timeout()
    data = b"".join(buffer)  # nothing runs between the join and the clear: no entry can slip in
    buffer.clear()
    size = len(data)
    content._size -= size
    cursor = content._cursor = content._cursor + size
    splits = content._http_chunk_splits
    while splits and splits[0] < cursor:  # as _read_nowait_chunk: split points already read are dropped
        splits.popleft()
    if content._size < content._low_water and (splits is None or len(splits) < content._low_water_chunks):
        content._protocol.resume_reading()
    return data


class WholeBodyResponse(web.StreamResponse):
    """A response whose body has already arrived whole: its headers wait for the body and go out in the
    same write (aiohttp's `Response` does the same), one send and one segment where a StreamResponse
    takes two. On an aiohttp without this class attribute it is a plain StreamResponse."""

    _send_headers_immediately = False
