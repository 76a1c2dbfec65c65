"""The reverse-proxy handler: forward a call byte for byte, tap a copy, hand one record to the recorder.

Header policy: hop-by-hop headers (RFC 9110 7.6.1, and any named in `Connection`), `Host` and the
proxy's own `X-Ledger-*` headers are not forwarded; everything else is. Only the configured upstream
is reachable: absolute-form targets, CONNECT and host-steering headers are refused with 400.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .capture import CapturedCall, classify_other_path, new_record
from .completions import CompletionRecord
from .config import Config
from .request_facts import (
    RequestFacts,
    bearer_key,
    inspect_request,
    key_fingerprint,
    new_request_id,
    redact_query,
)
from .taps import MAX_PARSED_BODY, BodyTap, StreamTap
from .upstream_read import read_available

STREAM_HEAD_BYTES = 64 * 1024
STREAM_TAIL_BYTES = 1024 * 1024

REQUEST_ID_HEADER = "X-Ledger-Request-Id"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_FORWARDED_REQUEST = HOP_BY_HOP | {"host", "content-length"}
NOT_FORWARDED_RESPONSE = HOP_BY_HOP
STEERING_HEADERS = frozenset(
    {
        "x-forwarded-host",
        "x-forwarded-server",
        "x-original-host",
        "x-host",
        "x-original-url",
        "x-rewrite-url",
        "x-http-host-override",
    }
)
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
UPSTREAM_ID_HEADERS = ("x-generation-id", "x-request-id", "request-id", "apim-request-id")
DISCONNECTED = ("client_disconnected", "client disconnected")
EPOCH = datetime.fromtimestamp(0, UTC)

Submit = Callable[[CompletionRecord | CapturedCall], None]


def json_error(status: int, message: str, error_type: str, code: str, request_id: str | None = None) -> web.Response:
    """An OpenAI-style error body, so clients report the proxy's errors like any API error."""
    body = orjson.dumps({"error": {"message": message, "type": error_type, "code": code}})
    response = web.Response(status=status, body=body, content_type="application/json")
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def _connection_named(headers: Any) -> frozenset[str]:
    """Header names listed in `Connection` (hop-by-hop by declaration, RFC 9110 7.6.1)."""
    names = set()
    for value in headers.getall("Connection", ()):
        if value in CONNECTION_OPTIONS:  # the usual `keep-alive` or `close`, nothing to split
            continue
        for part in value.split(","):
            name = part.strip().lower()
            if name not in CONNECTION_OPTIONS:
                names.add(name)
    return frozenset(names)


CONNECTION_OPTIONS = frozenset({"keep-alive", "close", "Keep-Alive", "Close", ""})  # the usual values name no header


# Headers that need a look at each one: the fast paths below apply only when none of these is present.
UNUSUAL_REQUEST_HEADERS = (HOP_BY_HOP - {"connection"}) | STEERING_HEADERS | {"forwarded"}
UNUSUAL_RESPONSE_HEADERS = HOP_BY_HOP - {"connection", "keep-alive", "transfer-encoding"}
DROPPED_REQUEST_HEADERS = frozenset({"host", "content-length", "connection"})
DROPPED_RESPONSE_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding"})
FEW_HEADERS = 8


def _fast_copy(
    headers: Any, unusual: frozenset[str], dropped: frozenset[str]
) -> tuple[CIMultiDict[str] | None, str]:
    """(a copy of the headers without the `dropped` names, their lowercased names joined by newlines), or
    (None, "") when the headers need the one-at-a-time filter: fewer than FEW_HEADERS (the loop costs
    less), an `unusual` name, or a Connection header naming others. The names are lowercased and checked
    as one set, and the copy is made in C, instead of a Python loop over every header (an SDK sends
    fifteen or more)."""
    if len(headers) < FEW_HEADERS:
        return None, ""
    joined = "\n".join(headers.keys()).lower()  # in C: lower() on each name costs more
    names = joined.split("\n")
    if not unusual.isdisjoint(names) or ("connection" in names and _connection_named(headers)):
        return None, ""
    out = CIMultiDict(headers)
    for name in dropped.intersection(names):
        del out[name]
    return out, joined


def forwardable_request_headers(headers: Any) -> tuple[CIMultiDict[str], str | None]:
    """The headers to send upstream, and why the request must be refused (a host-steering header)."""
    out, joined = _fast_copy(headers, UNUSUAL_REQUEST_HEADERS, DROPPED_REQUEST_HEADERS)
    if out is None:
        return filter_request_headers(headers)
    if "x-ledger-" in joined:  # the proxy's own headers are not forwarded
        for name in joined.split("\n"):
            if name[:9] == "x-ledger-":
                out.popall(name, None)
    return out, None


def filter_request_headers(headers: Any) -> tuple[CIMultiDict[str], str | None]:
    """forwardable_request_headers, one header at a time: for requests with unusual headers."""
    dropped = _connection_named(headers) if "Connection" in headers else frozenset()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in NOT_FORWARDED_REQUEST or lower[:9] == "x-ledger-" or (dropped and lower in dropped):
            continue
        if lower in STEERING_HEADERS or (lower == "forwarded" and "host=" in value.lower()):
            return out, f"header {name} is not accepted: the upstream is fixed by configuration"
        out.add(name, value)
    return out, None


def forwardable_response_headers(headers: Any) -> CIMultiDict[str]:
    """The upstream's headers for the client, without hop-by-hop ones."""
    out, _ = _fast_copy(headers, UNUSUAL_RESPONSE_HEADERS, DROPPED_RESPONSE_HEADERS)
    return filter_response_headers(headers) if out is None else out


def filter_response_headers(headers: Any) -> CIMultiDict[str]:
    """forwardable_response_headers, one header at a time."""
    dropped = _connection_named(headers) if "Connection" in headers else frozenset()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in NOT_FORWARDED_RESPONSE or (dropped and lower in dropped):
            continue
        out.add(name, value)
    return out


def refusal(request: web.Request) -> str | None:
    """Why a request target may not pass (the proxy is not an open proxy), or None."""
    if request.method == "CONNECT":
        return "CONNECT is not supported: chatledger forwards only to its configured upstream"
    if not request.raw_path.startswith("/"):
        return "absolute-form request targets are not accepted: send the path only"
    return None


def read_failure(exc: BaseException) -> tuple[str, str]:
    """(outcome, reason) for an upstream read that failed mid-response."""
    if isinstance(exc, TimeoutError):  # before OSError: it is one (aiohttp's read timeout too)
        return ("timeout", "upstream read timed out mid-response")
    return ("upstream_error", f"upstream connection lost mid-response: {type(exc).__name__}: {exc}")


async def _salvage(
    response: web.StreamResponse, stream_tap: _Copy | _StrippedCopy | None, failure: tuple[str, str]
) -> tuple[str, str]:
    """The upstream failed mid-stream: fold what was seen and pass on bytes the tap still held back."""
    if stream_tap is not None:
        held = stream_tap.close(time.perf_counter(), complete=False)
        if held:
            with contextlib.suppress(ConnectionError):
                await response.write(held)
    return failure


@dataclass(slots=True)
class _Call:
    """A logged call in flight. Stays in this process: it holds the client's key (for redaction)."""

    request_id: str
    started: float
    started_wall: float
    method: str
    path: str
    chat: bool
    key: str | None
    key_hash: str | None
    tag_headers: list[str] | None
    user_header: str | None
    body: bytes | None = None
    facts: RequestFacts | None = None
    done: bool = False


@dataclass(slots=True)
class _Copy:
    """The copy of a response's reads kept for the writer, bounded by MAX_PARSED_BODY. A tap like
    StreamTap (feed/close), except that it never holds bytes back from the client.

    A body past the bound is dropped (nothing whole to parse). An event stream past it keeps its first
    STREAM_HEAD_BYTES and a rolling last STREAM_TAIL_BYTES: identity, finish and usage are there."""

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
class _StrippedCopy:
    """A raw copy for the writer, while the client's bytes go through a strip-only StreamTap that cuts
    the usage chunk the proxy asked for. The tap folds only until it knows the stream's shape; the
    writer folds the whole stream, usage chunk included, from the copy."""

    copy: _Copy
    strip: StreamTap

    def feed(self, chunk: bytes, now: float) -> bytes:
        self.copy.feed(chunk, now)
        return self.strip.feed(chunk, now)

    def close(self, now: float, complete: bool = True) -> bytes:
        return self.strip.close(now, complete)


def _not_started(item: CompletionRecord | CapturedCall) -> None:
    raise RuntimeError("the forwarder has no recorder yet: the app's cleanup contexts have not run")


class Forwarder:
    """Holds what every request needs, resolved once: upstream base, timeouts, session, recorder.
    `handle` is the catch-all route's handler itself; the app's cleanup contexts set `session` and
    `submit` (the recorder's).

    A chat call is captured raw (an Exchange) and parsed by the writer. Only calls that never got a
    response and calls with logging of all paths build their record here. A stream whose injected usage
    chunk is cut out of the client's bytes is captured raw too: the request path only finds that chunk.
    """

    def __init__(self, config: Config) -> None:
        self._upstream = config.upstream.url
        self._max_body = config.server.max_body_size
        self._all_paths = config.logging.all_paths
        self._inject_usage = config.logging.inject_stream_usage
        self.submit: Submit = _not_started
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The forwarding route's handler: read the body, send it upstream, relay the answer. The router
        has already refused CONNECT and targets not in origin form (`refusal`). One coroutine from the
        request to the relay: each level of calls costs every request a little."""
        headers, reason = forwardable_request_headers(request.headers)
        if reason is not None:
            return json_error(400, reason, "invalid_request_error", "proxy_refused")
        method = request.method
        chat = method == "POST" and request.path[-17:] == "/chat/completions"
        call = self._call(request, method, chat) if chat or self._all_paths else None
        try:
            if request.content_length is not None and request.content_length > self._max_body:
                return self._too_large(call)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._too_large(call)
            send = body
            if call is not None:
                call.body = body
                # only a streaming request can need usage injected: anything else is read by the writer
                if chat and self._inject_usage and b'"stream"' in body:
                    call.facts = inspect_request(body, inject_usage=True)
                    send = call.facts.body

            assert self.session is not None
            try:
                upstream = await self.session.request(
                    method,
                    URL(self._upstream + request.raw_path, encoded=True),
                    data=send if send else None,
                    headers=headers,
                    allow_redirects=False,
                    skip_auto_headers=SKIP_AUTO_HEADERS,
                )
            except (TimeoutError, aiohttp.ServerTimeoutError):
                return self._failed(call, 504, "timeout", "upstream timed out before responding")
            except aiohttp.ClientConnectorError as exc:
                return self._failed(call, 502, "unreachable", f"upstream unreachable: {exc}")
            except aiohttp.ClientError as exc:
                message = f"upstream failed before responding: {type(exc).__name__}: {exc}"
                return self._failed(call, 502, "upstream_error", message)

            try:
                if call is None:
                    return await self._relay_unlogged(request, upstream)
                event_stream = upstream.headers.get("Content-Type", "")[:17].lower() == "text/event-stream"
                if chat:
                    return await self._relay_captured(request, upstream, call, event_stream)
                return await self._relay_recorded(request, upstream, call, event_stream)
            finally:
                upstream.release()
        except asyncio.CancelledError:
            if call is not None and not call.done:
                record = self._record(call)
                record.outcome, record.error = "client_disconnected", "client disconnected"
                self._finish(call, record)
            raise

    @staticmethod
    def _call(request: web.Request, method: str, chat: bool) -> _Call:
        started = time.perf_counter()
        headers = request.headers
        key = bearer_key(headers)
        return _Call(
            new_request_id(),
            started,
            time.time(),
            method[:16],
            redact_query(request.raw_path),
            chat,
            key,
            key_fingerprint(key) if key is not None else None,
            headers.getall("X-Ledger-Tags") if "X-Ledger-Tags" in headers else None,
            headers.get("X-Ledger-User"),
        )

    def _record(self, call: _Call) -> CompletionRecord:
        facts = call.facts
        if facts is None and call.chat and call.body is not None:
            facts = inspect_request(call.body, inject_usage=False)
        return new_record(
            call.request_id, call.started_wall, call.method, call.path, self._upstream,
            call.key_hash, call.tag_headers, call.user_header, facts,
        )

    def _finish(self, call: _Call, record: CompletionRecord) -> None:
        record.duration_ms = round((time.perf_counter() - call.started) * 1000, 3)
        if call.key and record.error and call.key in record.error:
            record.error = record.error.replace(call.key, "[redacted]")
        call.done = True
        self.submit(record)

    def _too_large(self, call: _Call | None) -> web.Response:
        message = f"request body is larger than the proxy's limit of {self._max_body} bytes"
        request_id = None
        if call is not None:
            record = self._record(call)
            record.status_code = 413
            record.outcome = "rejected"  # refused by the proxy itself: the upstream never saw it
            record.error = message
            request_id = record.request_id
            self._finish(call, record)
        return json_error(413, message, "invalid_request_error", "request_too_large", request_id)

    def _failed(self, call: _Call | None, status: int, outcome: str, message: str) -> web.Response:
        request_id = None
        if call is not None:
            record = self._record(call)
            record.outcome = outcome
            record.error = message
            request_id = record.request_id
            self._finish(call, record)
            if call.key:
                message = message.replace(call.key, "[redacted]")
        code = "upstream_timeout" if status == 504 else "upstream_unreachable"
        return json_error(status, message, "proxy_error", code, request_id)

    @staticmethod
    def _client_tap(
        call: _Call, upstream: aiohttp.ClientResponse, event_stream: bool, copy: _Copy
    ) -> _Copy | _StrippedCopy:
        """The raw copy, and when the proxy added include_usage to a stream, the tap that cuts the
        usage chunk out of the client's bytes."""
        facts = call.facts
        if not (event_stream and upstream.status < 300 and facts is not None and facts.usage_injected):
            return copy
        scratch = CompletionRecord(call.request_id, EPOCH, call.method, call.path, "")  # never stored
        strip = StreamTap(
            scratch,
            upstream.headers.get("Content-Encoding"),
            strip_usage_chunk=True,
            expected_choices=facts.choices,
            strip_only=True,
        )
        return _StrippedCopy(copy, strip) if strip.stripping else copy

    async def _relay_unlogged(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        headers = forwardable_response_headers(upstream.headers)
        response = relay_response(upstream, headers)
        try:
            failure = await self._pump(request, upstream, response, None, None)
        except asyncio.CancelledError:
            upstream.close()
            raise
        self._after_failure(request, upstream, failure)
        return response

    async def _relay_captured(
        self, request: web.Request, upstream: aiohttp.ClientResponse, call: _Call, event_stream: bool
    ) -> web.StreamResponse:
        """Pass the response on read by read and keep the reads; the writer parses them."""
        headers_at = time.perf_counter()
        headers = forwardable_response_headers(upstream.headers)
        headers[REQUEST_ID_HEADER] = call.request_id
        copy = _Copy(times=[] if event_stream and upstream.status < 300 else None)
        tap = self._client_tap(call, upstream, event_stream, copy)
        if tap is not copy:
            headers.popall("Content-Length", None)  # the client gets fewer bytes than the upstream sent
        response = relay_response(upstream, headers)
        try:
            failure = await self._pump(request, upstream, response, tap, None)
        except asyncio.CancelledError:  # the client went away while we waited on the upstream
            upstream.close()
            self._capture(call, upstream, event_stream, headers_at, copy, DISCONNECTED)
            raise
        self._after_failure(request, upstream, failure)
        self._capture(call, upstream, event_stream, headers_at, copy, failure)
        return response

    def _capture(
        self,
        call: _Call,
        upstream: aiohttp.ClientResponse,
        event_stream: bool,
        headers_at: float,
        copy: _Copy,
        failure: tuple[str, str] | None,
    ) -> None:
        call.done = True
        self.submit(
            (  # an Exchange's fields, as a plain tuple: see capture.CapturedCall
                call.request_id,
                call.started_wall,
                call.started,
                call.method,
                call.path,
                self._upstream,
                call.key_hash,
                len(call.key) if call.key else 0,
                call.tag_headers,
                call.user_header,
                call.body or b"",
                upstream.status,
                _upstream_request_id(upstream),
                upstream.headers.get("Content-Encoding"),
                event_stream,
                headers_at,
                *copy.reads(),
                time.perf_counter(),
                copy.overflow,
                failure,
                copy.gap_at,
            )
        )

    async def _relay_recorded(
        self, request: web.Request, upstream: aiohttp.ClientResponse, call: _Call, event_stream: bool
    ) -> web.StreamResponse:
        """A call on another path (`all_paths` logging): its record is built here; an error body
        gives the record its summary."""
        record = self._record(call)
        headers = forwardable_response_headers(upstream.headers)
        record.status_code = upstream.status
        record.stream = record.stream or event_stream
        record.upstream_request_id = _upstream_request_id(upstream)
        record.ttft_ms = round((time.perf_counter() - call.started) * 1000, 3)
        body_tap = BodyTap(upstream.headers.get("Content-Encoding"))
        headers[REQUEST_ID_HEADER] = record.request_id

        response = relay_response(upstream, headers)
        try:
            failure = await self._pump(request, upstream, response, None, body_tap)
        except asyncio.CancelledError:  # the client went away while we waited on the upstream
            upstream.close()
            classify_other_path(record, DISCONNECTED, body_tap)
            self._finish(call, record)
            raise
        self._after_failure(request, upstream, failure)
        classify_other_path(record, failure, body_tap)
        self._finish(call, record)
        return response

    @classmethod
    def _after_failure(
        cls, request: web.Request, upstream: aiohttp.ClientResponse, failure: tuple[str, str] | None
    ) -> None:
        if failure is not None:
            upstream.close()
            if failure[0] != "client_disconnected":
                cls._abort(request)

    @staticmethod
    async def _pump(
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        stream_tap: _Copy | _StrippedCopy | None,
        body_tap: BodyTap | None,
    ) -> tuple[str, str] | None:
        """Copy the body to the client read by read; returns (outcome, reason) if either side failed.

        stream_tap sees every read with its arrival time and decides what the client gets of it."""
        try:
            await response.prepare(request)
        except ConnectionError:
            return DISCONNECTED
        content = upstream.content
        while True:
            try:
                chunk = await read_available(content)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                return await _salvage(response, stream_tap, read_failure(exc))
            if stream_tap is not None:
                now = time.perf_counter()
                out = stream_tap.feed(chunk, now) if chunk else stream_tap.close(now)
            else:
                if body_tap is not None and chunk:
                    body_tap.feed(chunk)
                out = chunk
            try:
                if out:
                    await response.write(out)
                if not chunk:
                    await response.write_eof()
                    return None
            except ConnectionError:
                return DISCONNECTED

    @staticmethod
    def _abort(request: web.Request) -> None:
        """Cut the client connection so it sees a truncated response, not a complete one."""
        transport = request.transport
        if transport is not None:
            transport.abort()


class _WholeBodyResponse(web.StreamResponse):
    """A response whose body has already arrived whole: its headers wait for the body and go out in the
    same write (aiohttp's `Response` does the same), one send and one segment where a StreamResponse
    takes two. On an aiohttp without this class attribute it is a plain StreamResponse."""

    _send_headers_immediately = False


def relay_response(upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]) -> web.StreamResponse:
    """The client's response: headers sent at once while the upstream is still sending (a stream, a slow
    body), or with the body when all of it is already here."""
    kind = _WholeBodyResponse if upstream.content.is_eof() else web.StreamResponse
    return kind(status=upstream.status, reason=upstream.reason, headers=headers)


def _upstream_request_id(upstream: aiohttp.ClientResponse) -> str | None:
    for name in UPSTREAM_ID_HEADERS:
        value = upstream.headers.get(name)
        if value:
            return value[:200]
    return None
