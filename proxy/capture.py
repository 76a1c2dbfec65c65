"""What the request path keeps of a chat call, and how the writer turns it into a record later.

The request path only copies: ids, times, a few header values, the request body and the response reads.
Parsing the request, decoding the body or the SSE stream, classifying the outcome: all of that runs in
`materialize`, in the writer (a separate process by default), so a logged call costs the event loop
little more than an unlogged one. Pure code: no I/O.

An Exchange is a NamedTuple because it crosses a pipe: a tuple pickles several times faster than a
dataclass. The request path builds it as a plain tuple (a CapturedCall): that costs a quarter of calling
the NamedTuple, and pickles as it is; `materialize` takes either. It never holds the client's key, only
its fingerprint and length (see `redact_fingerprinted`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import UTC, datetime
from typing import Any, NamedTuple

from .completions import CompletionRecord, parse_completion_body
from .request_facts import RequestFacts, header_user, inspect_request, parse_tags
from .taps import MAX_PARSED_BODY, BodyTap, StreamTap, is_identity

log = logging.getLogger(__name__)

ERROR_SNIPPET_CHARS = 300
INTERNAL_ERROR = "chatledger could not parse this response (internal error, see its log)"
OVERFLOW = f"response over {MAX_PARSED_BODY // (1024 * 1024)} MiB not parsed"
_KEY_RUN = re.compile(r"[^\s\"'`,;:()\[\]{}<>]+")  # a key never spans whitespace, quotes or JSON punctuation


class Exchange(NamedTuple):
    """A chat call the upstream answered, as read off the wire. Times are time.perf_counter() values."""

    request_id: str
    started_wall: float  # time.time() when the request arrived
    started: float
    method: str
    path: str
    upstream: str
    api_key_hash: str | None
    key_length: int
    tag_headers: list[str] | None
    user_header: str | None
    request_body: bytes
    status: int
    upstream_request_id: str | None
    encoding: str | None
    event_stream: bool  # Content-Type text/event-stream
    headers_at: float
    chunks: list[bytes]
    times: list[float] | None  # arrival time of each read of a 2xx event stream; None: parse as one body
    finished: float
    overflow: bool  # the reads passed MAX_PARSED_BODY and were not all kept
    failure: tuple[str, str] | None  # (outcome, reason) when either side failed mid-response
    gap_at: int = -1  # an overflowed event stream: chunks[gap_at:] are its last reads, after a gap


CapturedCall = tuple[Any, ...]  # an Exchange's fields in order, as the request path builds them


def materialize(captured: Exchange | CapturedCall) -> CompletionRecord:
    """The record of a captured call; a parser bug costs the parsed fields, never the row."""
    exchange = captured if type(captured) is Exchange else Exchange._make(captured)
    try:
        return _materialize(exchange)
    except Exception:
        log.exception("parsing the response of request %s failed", exchange.request_id)
    record = new_record(
        exchange.request_id, exchange.started_wall, exchange.method, exchange.path, exchange.upstream,
        exchange.api_key_hash, exchange.tag_headers, exchange.user_header, None,
    )
    record.status_code = exchange.status
    record.duration_ms = round((exchange.finished - exchange.started) * 1000, 3)
    record.outcome, record.error = "unparsed", INTERNAL_ERROR
    return record


def classify_other_path(record: CompletionRecord, failure: tuple[str, str] | None, body_tap: BodyTap) -> None:
    """classify() for a call on another path than chat completions (`all_paths` logging): its body is
    read only for an error summary, and a parser bug costs that summary, never the row."""
    try:
        classify(record, failure, None, body_tap, chat=False, started=0.0)
    except Exception:
        log.exception("parsing the response of request %s failed", record.request_id)
        record.outcome, record.error = "unparsed", INTERNAL_ERROR


def _materialize(exchange: Exchange) -> CompletionRecord:
    facts = inspect_request(exchange.request_body, inject_usage=False)
    record = new_record(
        exchange.request_id, exchange.started_wall, exchange.method, exchange.path, exchange.upstream,
        exchange.api_key_hash, exchange.tag_headers, exchange.user_header, facts,
    )
    record.status_code = exchange.status
    record.upstream_request_id = exchange.upstream_request_id
    record.stream = record.stream or exchange.event_stream
    record.duration_ms = round((exchange.finished - exchange.started) * 1000, 3)
    if exchange.overflow and not _tail_kept(exchange):  # the request path stopped keeping a copy
        record.outcome, record.error = exchange.failure or ("unparsed", OVERFLOW)
        return record
    stream_tap: StreamTap | None = None
    body_tap: BodyTap | None = None
    if exchange.times is not None:
        stream_tap = StreamTap(record, exchange.encoding, strip_usage_chunk=False, expected_choices=facts.choices)
        if exchange.gap_at < 0:
            stream_tap.feed_all(exchange.chunks, exchange.times)
        else:  # a stream over MAX_PARSED_BODY: its head, then its last reads
            gap = exchange.gap_at
            stream_tap.feed_all(exchange.chunks[:gap], exchange.times[:gap])
            stream_tap.resume_after_gap(b"".join(exchange.chunks[gap:]), exchange.times[-1])
        if exchange.failure is None:
            stream_tap.close(exchange.finished)
        elif exchange.failure[0] != "client_disconnected":  # the upstream broke off: fold what came
            stream_tap.close(exchange.finished, complete=False)
    else:
        record.ttft_ms = round((exchange.headers_at - exchange.started) * 1000, 3)
        body_tap = BodyTap(exchange.encoding)
        for chunk in exchange.chunks:
            body_tap.feed(chunk)
    classify(record, exchange.failure, stream_tap, body_tap, chat=True, started=exchange.started)
    if record.error and exchange.api_key_hash:
        record.error = redact_fingerprinted(record.error, exchange.api_key_hash, exchange.key_length)
    return record


def _tail_kept(exchange: Exchange) -> bool:
    """An uncompressed event stream over MAX_PARSED_BODY keeps its head and last reads: still foldable."""
    return exchange.gap_at >= 0 and exchange.times is not None and is_identity(exchange.encoding)


def new_record(
    request_id: str,
    started_wall: float,
    method: str,
    path: str,
    upstream: str,
    api_key_hash: str | None,
    tag_headers: list[str] | None,
    user_header: str | None,
    facts: RequestFacts | None,
) -> CompletionRecord:
    """A record with what the request told: ids, key fingerprint, tags, user, requested model."""
    record = CompletionRecord(
        request_id=request_id,
        started_at=datetime.fromtimestamp(started_wall, UTC),
        method=method,
        path=path,
        upstream=upstream,
        api_key_hash=api_key_hash,
    )
    if tag_headers:
        record.tags = parse_tags(tag_headers)
    if facts is not None:
        record.requested_model = facts.model
        record.stream = facts.stream
    record.user = (facts.user if facts is not None else None) or header_user(user_header)
    return record


def redact_fingerprinted(text: str, fingerprint: str, key_length: int) -> str:
    """Replace the client's key in text, knowing only its fingerprint and length: every substring of
    that length inside a run of key characters is hashed and compared. Runs only on error text."""
    if key_length <= 0:
        return text
    found: list[str] = []
    for match in _KEY_RUN.finditer(text):
        run = match.group()
        for start in range(len(run) - key_length + 1):
            candidate = run[start : start + key_length]
            digest = hashlib.sha256(candidate.encode("utf-8", "surrogateescape")).hexdigest()[:16]
            if digest == fingerprint:
                found.append(candidate)
    for key in found:
        text = text.replace(key, "[redacted]")
    return text


def error_summary(status: int, body: bytes | None) -> str:
    if body:
        text = " ".join(body[: ERROR_SNIPPET_CHARS * 4].decode("utf-8", "replace").split())
        if text:
            return f"HTTP {status}: {text[:ERROR_SNIPPET_CHARS]}"
    return f"HTTP {status}"


def classify(
    record: CompletionRecord,
    failure: tuple[str, str] | None,
    stream_tap: StreamTap | None,
    body_tap: BodyTap | None,
    chat: bool,
    started: float,
) -> None:
    """Set outcome and error (and parse a plain body) once the exchange is over."""
    status = record.status_code or 0
    body: bytes | None = None
    parsed = False
    if stream_tap is not None:
        if failure is not None:
            stream_tap.folder.finish()
        first = stream_tap.first_content_at or stream_tap.first_event_at
        if first is not None:
            record.ttft_ms = round((first - started) * 1000, 3)
        parsed = stream_tap.folder.parsed_events > 0
        failed = stream_tap.folder.failed
    elif body_tap is not None:
        body = body_tap.body()
        if body is not None and (chat or status >= 400):
            parsed = parse_completion_body(record, body)
        failed = bool(record.error) or any(c.finish_reason == "error" for c in record.choices)
    else:
        failed = False
    if failure is not None and not (
        failure[0] == "client_disconnected" and stream_tap is not None and stream_tap.folder.done
    ):  # a client that hangs up right after [DONE] got everything: not a disconnect
        record.outcome, record.error = failure[0], record.error or failure[1]
        return
    if status >= 400 or (chat and status >= 300):  # a redirect is no completion either
        record.outcome = "upstream_error"
        if not record.error:
            record.error = error_summary(status, body)
        return
    if chat and 200 <= status < 300:
        if not parsed:
            record.outcome = "unparsed"
            reason = body_tap.failure if body_tap is not None else None
            record.error = record.error or reason or "response could not be parsed as a chat completion"
        elif failed:
            record.outcome = "upstream_error"
        else:
            record.outcome = "ok"
        return
    record.outcome = "ok"
