"""The hand-off from the request path to the writer (`Capture`), and the one entry point that parses it
(`materialize`).

The request path only copies: ids, times, a few header values, the request body and the response reads.
Parsing the request, decoding the body or the SSE stream, classifying the outcome: all of that runs in
`materialize`, in the writer (a separate process by default), so a logged call costs the event loop
little more than an unlogged one. Pure code: no I/O.

A Capture is a NamedTuple because it crosses a pipe: a tuple pickles several times faster than a
dataclass. It never holds a credential the client sent, only fingerprints and lengths (see
`credentials.redact_fingerprinted`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, NamedTuple

from ..credentials import redact_fingerprinted
from .decoders import MAX_PARSED_BODY, BodyTap, decode_reads, is_identity
from .fields import MAX_ERROR_CHARS
from .formats import FORMATS, WireFormat
from .outcome import classify
from .record import CompletionRecord
from .request import RequestFacts, header_user, inspect_request, parse_tags
from .stream_tap import StreamTap

log = logging.getLogger(__name__)

INTERNAL_ERROR = "chatledger could not parse this response (internal error, see its log)"
OVERFLOW = f"response over {MAX_PARSED_BODY // (1024 * 1024)} MiB not parsed"


class Capture(NamedTuple):
    """A logged call as read off the wire. Times are time.perf_counter() values."""

    request_id: str
    started_wall: float  # time.time() when the request arrived
    started: float
    method: str
    path: str  # the request target, credentials in its query redacted
    upstream: str
    api: str | None  # the wire format its body is parsed as (formats.FORMATS); None: a path logged with all_paths
    api_key_hash: str | None
    secrets: tuple[tuple[str, int], ...]  # (fingerprint, length) of every credential the request carried
    tag_headers: list[str] | None
    user_header: str | None
    request_body: bytes  # empty for a call whose request nothing parses
    status: int | None  # the upstream's; the proxy's own when it refused the call; None without an answer
    upstream_request_id: str | None
    encoding: str | None
    event_stream: bool  # Content-Type text/event-stream
    headers_at: float | None  # None: the upstream never answered (see failure)
    chunks: Any  # list[bytes], the response reads; in transit to the writer process maybe a ring.RingSlice
    times: list[float] | None  # arrival time of each read of a 2xx event stream; None: parse as one body
    finished: float
    overflow: bool  # the reads passed MAX_PARSED_BODY and were not all kept
    failure: tuple[str, str] | None  # (outcome, reason) when either side failed, or the proxy refused
    gap_at: int = -1  # an overflowed event stream: chunks[gap_at:] are its last reads, after a gap
    copy_note: str | None = None  # why the request path kept less than MAX_PARSED_BODY (its copy budget)


def materialize(capture: Capture) -> CompletionRecord:
    """The record of a captured call; a parser bug costs the parsed fields, never the row."""
    try:
        return _materialize(capture)
    except Exception:
        log.exception("parsing the response of request %s failed", capture.request_id)
    record = new_record(capture, None)
    record.status_code = capture.status
    record.duration_ms = round((capture.finished - capture.started) * 1000, 3)
    record.outcome, record.error = "unparsed", INTERNAL_ERROR
    return record


def _materialize(capture: Capture) -> CompletionRecord:
    wire = FORMATS.get(capture.api) if capture.api is not None else None
    facts = inspect_request(capture.request_body, inject_usage=False) if wire is not None else None
    record = new_record(capture, facts)
    record.status_code = capture.status
    record.duration_ms = round((capture.finished - capture.started) * 1000, 3)
    if capture.headers_at is None:  # refused by the proxy, or no answer from the upstream
        record.outcome, record.error = capture.failure or ("upstream_error", "no response")
    else:
        _parse_response(capture, record, wire, facts.choices if facts is not None else 1)
    if record.error:
        record.error = finish_error(record.error, capture.secrets)
    return record


def finish_error(error: str, secrets: tuple[tuple[str, int], ...]) -> str:
    """The error as stored: every credential of the request scrubbed, then cut to MAX_ERROR_CHARS (in that
    order: a cut through a key would leave a part of it that no fingerprint matches)."""
    if secrets:
        error = redact_fingerprinted(error, secrets)
    return error[:MAX_ERROR_CHARS]


def _parse_response(
    capture: Capture, record: CompletionRecord, wire: WireFormat | None, expected_choices: int
) -> None:
    record.upstream_request_id = capture.upstream_request_id
    record.stream = record.stream or capture.event_stream
    if capture.overflow and not _tail_kept(capture):  # the request path stopped keeping a copy
        record.outcome, record.error = capture.failure or ("unparsed", capture.copy_note or OVERFLOW)
        return
    stream_tap: StreamTap | None = None
    body_tap: BodyTap | None = None
    undecoded: str | None = None  # why an encoded stream was parsed only in part
    if capture.times is not None and wire is not None and wire.new_folder is not None:
        chunks, times = capture.chunks, capture.times
        if not is_identity(capture.encoding):  # decoded first (bounded), then folded as a plain stream
            chunks, times, undecoded = decode_reads(chunks, times, capture.encoding)
        folder = wire.new_folder(record, expected_choices)
        stream_tap = StreamTap(record, None, strip_usage_chunk=False, folder=folder)
        if capture.gap_at < 0:
            stream_tap.feed_all(chunks, times)
        else:  # a stream over MAX_PARSED_BODY: its head, then its last reads
            gap = capture.gap_at
            stream_tap.feed_all(capture.chunks[:gap], capture.times[:gap])
            stream_tap.resume_after_gap(b"".join(capture.chunks[gap:]), capture.times[-1])
        if capture.failure is None:
            stream_tap.close(capture.finished)
        elif capture.failure[0] != "client_disconnected":  # the upstream broke off: fold what came
            stream_tap.close(capture.finished, complete=False)
    else:
        assert capture.headers_at is not None
        record.ttft_ms = round((capture.headers_at - capture.started) * 1000, 3)
        body_tap = BodyTap(capture.encoding)
        for chunk in capture.chunks:
            body_tap.feed(chunk)
    classify(record, capture.failure, stream_tap, body_tap, wire, started=capture.started)
    if undecoded is not None and capture.failure is None:
        record.outcome, record.error = "unparsed", undecoded


def _tail_kept(capture: Capture) -> bool:
    """An uncompressed event stream over MAX_PARSED_BODY keeps its head and last reads: still foldable."""
    return capture.gap_at >= 0 and capture.times is not None and is_identity(capture.encoding)


def new_record(capture: Capture, facts: RequestFacts | None) -> CompletionRecord:
    """A record with what the request told: ids, key fingerprint, tags, user, requested model."""
    record = CompletionRecord(
        request_id=capture.request_id,
        started_at=datetime.fromtimestamp(capture.started_wall, UTC),
        method=capture.method,
        path=capture.path,
        upstream=capture.upstream,
        api_key_hash=capture.api_key_hash,
        api=capture.api,
    )
    if capture.tag_headers:
        record.tags = parse_tags(capture.tag_headers)
    if facts is not None:
        record.requested_model = facts.model
        record.stream = facts.stream
    record.user = (facts.user if facts is not None else None) or header_user(capture.user_header)
    return record
