"""The reverse-proxy handler: forward a call byte for byte, tap a copy, hand one record to the recorder.

Header policy: hop-by-hop headers (RFC 9110 7.6.1, and any named in `Connection`), `Host` and the
proxy's own `X-Ledger-*` headers are not forwarded; everything else is. Only the configured upstream
is reachable: absolute-form targets, CONNECT and host-steering headers are refused with 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .completions import CompletionRecord, parse_completion_body
from .config import Config
from .request_facts import (
    RequestFacts,
    bearer_key,
    header_user,
    inspect_request,
    key_fingerprint,
    new_request_id,
    parse_tags,
    redact_query,
)
from .taps import BodyTap, StreamTap

log = logging.getLogger(__name__)

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
ERROR_SNIPPET_CHARS = 300

Submit = Callable[[CompletionRecord], None]


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
        for part in value.split(","):
            name = part.strip().lower()
            if name not in CONNECTION_OPTIONS:
                names.add(name)
    return frozenset(names)


CONNECTION_OPTIONS = frozenset({"keep-alive", "close", ""})  # the usual values name no header


def forwardable_request_headers(headers: Any) -> tuple[CIMultiDict[str], str | None]:
    """The headers to send upstream, and why the request must be refused (a host-steering header)."""
    dropped = _connection_named(headers) if "Connection" in headers else frozenset()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in NOT_FORWARDED_REQUEST or lower.startswith("x-ledger-") or (dropped and lower in dropped):
            continue
        if lower in STEERING_HEADERS or (lower == "forwarded" and "host=" in value.lower()):
            return out, f"header {name} is not accepted: the upstream is fixed by configuration"
        out.add(name, value)
    return out, None


def forwardable_response_headers(headers: Any) -> CIMultiDict[str]:
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


def _error_summary(status: int, body: bytes | None) -> str:
    if body:
        text = " ".join(body[: ERROR_SNIPPET_CHARS * 4].decode("utf-8", "replace").split())
        if text:
            return f"HTTP {status}: {text[:ERROR_SNIPPET_CHARS]}"
    return f"HTTP {status}"


async def _salvage(
    response: web.StreamResponse, stream_tap: StreamTap | None, failure: tuple[str, str]
) -> tuple[str, str]:
    """The upstream failed mid-stream: fold what was seen and pass on bytes the tap still held back."""
    if stream_tap is not None:
        held = stream_tap.close(time.perf_counter(), complete=False)
        if held:
            with contextlib.suppress(ConnectionError):
                await response.write(held)
    return failure


class Forwarder:
    """Holds what every request needs, resolved once: upstream base, timeouts, session, recorder."""

    def __init__(self, config: Config, submit: Submit) -> None:
        self._upstream = config.upstream.url
        self._max_body = config.server.max_body_size
        self._all_paths = config.logging.all_paths
        self._inject_usage = config.logging.inject_stream_usage
        self._submit = submit
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        reason = refusal(request)
        if reason is None:
            headers, reason = forwardable_request_headers(request.headers)
        if reason is not None:
            return json_error(400, reason, "invalid_request_error", "proxy_refused")
        started = time.perf_counter()
        method = request.method
        chat = method == "POST" and request.path.endswith("/chat/completions")
        record: CompletionRecord | None = None
        key: str | None = None
        if chat or self._all_paths:
            record = CompletionRecord(
                request_id=new_request_id(),
                started_at=datetime.now(UTC),
                method=method[:16],
                path=redact_query(request.raw_path),
                upstream=self._upstream,
            )
            key = bearer_key(request.headers)
            if key is not None:
                record.api_key_hash = key_fingerprint(key)
            if "X-Ledger-Tags" in request.headers:
                record.tags = parse_tags(request.headers.getall("X-Ledger-Tags"))
        try:
            return await self._forward(request, headers, record, chat, started, key)
        except asyncio.CancelledError:
            if record is not None and record.duration_ms is None:
                record.outcome = "client_disconnected"
                record.error = record.error or "client disconnected"
                self._finish(record, started)
            raise

    def _finish(self, record: CompletionRecord, started: float, key: str | None = None) -> None:
        record.duration_ms = round((time.perf_counter() - started) * 1000, 3)
        if key and record.error and key in record.error:
            record.error = record.error.replace(key, "[redacted]")
        self._submit(record)

    async def _forward(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        record: CompletionRecord | None,
        chat: bool,
        started: float,
        key: str | None,
    ) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > self._max_body:
            return self._too_large(record, started)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(record, started)
        facts = RequestFacts(body=body)
        if chat and record is not None:
            facts = inspect_request(body, self._inject_usage)
            record.requested_model = facts.model
            record.stream = facts.stream
            record.user = facts.user or header_user(request.headers.get("X-Ledger-User"))
        elif record is not None:
            record.user = header_user(request.headers.get("X-Ledger-User"))

        assert self.session is not None
        url = URL(self._upstream + request.raw_path, encoded=True)
        try:
            upstream_cm = self.session.request(
                request.method,
                url,
                data=facts.body if facts.body else None,
                headers=headers,
                allow_redirects=False,
                skip_auto_headers=SKIP_AUTO_HEADERS,
            )
            upstream = await upstream_cm
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return self._failed(record, started, 504, "timeout", "upstream timed out before responding", key)
        except aiohttp.ClientConnectorError as exc:
            return self._failed(record, started, 502, "unreachable", f"upstream unreachable: {exc}", key)
        except aiohttp.ClientError as exc:
            message = f"upstream failed before responding: {type(exc).__name__}: {exc}"
            return self._failed(record, started, 502, "upstream_error", message, key)

        try:
            return await self._relay(request, upstream, record, facts, chat, started, key)
        finally:
            upstream.release()

    def _too_large(self, record: CompletionRecord | None, started: float) -> web.Response:
        message = f"request body is larger than the proxy's limit of {self._max_body} bytes"
        request_id = None
        if record is not None:
            record.status_code = 413
            record.outcome = "rejected"  # refused by the proxy itself: the upstream never saw it
            record.error = message
            request_id = record.request_id
            self._finish(record, started)
        return json_error(413, message, "invalid_request_error", "request_too_large", request_id)

    def _failed(
        self, record: CompletionRecord | None, started: float, status: int, outcome: str, message: str,
        key: str | None,
    ) -> web.Response:
        request_id = None
        if record is not None:
            record.outcome = outcome
            record.error = message
            request_id = record.request_id
            self._finish(record, started, key)
        code = "upstream_timeout" if status == 504 else "upstream_unreachable"
        if key:
            message = message.replace(key, "[redacted]")
        return json_error(status, message, "proxy_error", code, request_id)

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        record: CompletionRecord | None,
        facts: RequestFacts,
        chat: bool,
        started: float,
        key: str | None,
    ) -> web.StreamResponse:
        headers_at = time.perf_counter()
        headers = forwardable_response_headers(upstream.headers)
        is_sse = upstream.headers.get("Content-Type", "").lower().startswith("text/event-stream")
        encoding = upstream.headers.get("Content-Encoding")
        body_tap: BodyTap | None = None
        stream_tap: StreamTap | None = None
        if record is not None:
            record.status_code = upstream.status
            record.stream = record.stream or is_sse
            for name in UPSTREAM_ID_HEADERS:
                value = upstream.headers.get(name)
                if value:
                    record.upstream_request_id = value[:200]
                    break
            if is_sse and chat and upstream.status < 300:
                stream_tap = StreamTap(
                    record, encoding, strip_usage_chunk=facts.usage_injected, expected_choices=facts.choices
                )
                if stream_tap.stripping:
                    headers.popall("Content-Length", None)
            else:
                record.ttft_ms = round((headers_at - started) * 1000, 3)
                body_tap = BodyTap(encoding)
            headers[REQUEST_ID_HEADER] = record.request_id

        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        try:
            failure = await self._pump(request, upstream, response, stream_tap, body_tap)
        except asyncio.CancelledError:  # the client went away while we waited on the upstream
            upstream.close()
            if record is not None:
                self._complete(record, ("client_disconnected", "client disconnected"), stream_tap, body_tap,
                               chat, started)
                self._finish(record, started, key)
            raise
        if failure is not None:
            upstream.close()
            if failure[0] != "client_disconnected":
                self._abort(request)
        if record is not None:
            self._complete(record, failure, stream_tap, body_tap, chat, started)
            self._finish(record, started, key)
        return response

    @staticmethod
    async def _pump(
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        stream_tap: StreamTap | None,
        body_tap: BodyTap | None,
    ) -> tuple[str, str] | None:
        """Copy the body to the client read by read; returns (outcome, reason) if either side failed."""
        try:
            await response.prepare(request)
        except ConnectionError:
            return ("client_disconnected", "client disconnected")
        content = upstream.content
        while True:
            try:
                chunk = await content.readany()
            except TimeoutError:
                reason = "upstream read timed out mid-response"
                return await _salvage(response, stream_tap, ("timeout", reason))
            except (aiohttp.ClientError, OSError) as exc:
                reason = f"upstream connection lost mid-response: {type(exc).__name__}: {exc}"
                return await _salvage(response, stream_tap, ("upstream_error", reason))
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
                return ("client_disconnected", "client disconnected")

    @staticmethod
    def _abort(request: web.Request) -> None:
        """Cut the client connection so it sees a truncated response, not a complete one."""
        transport = request.transport
        if transport is not None:
            transport.abort()

    @classmethod
    def _complete(
        cls,
        record: CompletionRecord,
        failure: tuple[str, str] | None,
        stream_tap: StreamTap | None,
        body_tap: BodyTap | None,
        chat: bool,
        started: float,
    ) -> None:
        """Classify the call; a parser bug costs the parsed fields, never the row."""
        try:
            cls._classify(record, failure, stream_tap, body_tap, chat, started)
        except Exception:
            log.exception("parsing the response of request %s failed", record.request_id)
            record.outcome = "unparsed"
            record.error = "chatledger could not parse this response (internal error, see its log)"

    @staticmethod
    def _classify(
        record: CompletionRecord,
        failure: tuple[str, str] | None,
        stream_tap: StreamTap | None,
        body_tap: BodyTap | None,
        chat: bool,
        started: float,
    ) -> None:
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
                record.error = _error_summary(status, body)
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
