"""The reverse-proxy handler: forward a call byte for byte, keep a copy, hand one Capture to the recorder.

The request path parses nothing it can leave to the writer: it copies ids, times, a few header values,
the request body and the response reads into a `Capture` (proxy/parse/capture.py), and the writer
turns that into the call's record. The one exception is a stream whose usage chunk the proxy asked for:
the client must not get that chunk, so a strip-only StreamTap finds and cuts it on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..config import Config
from ..credentials import bearer_key, fingerprints, key_fingerprint, redact_query, redact_secrets, request_secrets
from ..logs import RateLimited
from ..parse.capture import Capture
from ..parse.formats import FORMATS
from ..parse.record import CompletionRecord
from ..parse.request import RequestFacts, inspect_request
from ..parse.stream_tap import StreamTap
from ..runtime import release_free_memory
from .aiohttp_compat import WholeBodyResponse, read_available
from .copies import BUDGET_NOTE, CopyBudget, ResponseCopy, StrippedCopy
from .policy import forwardable_request_headers, forwardable_response_headers
from .request_ids import new_request_id
from .routing import Routes, api_of

REQUEST_ID_HEADER = "X-Ledger-Request-Id"
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
UPSTREAM_ID_HEADERS = ("x-generation-id", "x-request-id", "request-id", "apim-request-id")
DISCONNECTED = ("client_disconnected", "client disconnected")
EPOCH = datetime.fromtimestamp(0, UTC)
USAGE_INJECTED_APIS = frozenset(api for api, wire in FORMATS.items() if wire.injects_usage)

Submit = Callable[[Capture], None]
# an upstream that is down or hangs under load would otherwise log a line per call
_upstream_trouble = RateLimited(logging.getLogger("chatledger.upstream"), burst=5, period=60.0)


def json_error(status: int, message: str, error_type: str, code: str, request_id: str | None = None) -> web.Response:
    """An OpenAI-style error body, so clients report the proxy's errors like any API error."""
    body = orjson.dumps({"error": {"message": message, "type": error_type, "code": code}})
    response = web.Response(status=status, body=body, content_type="application/json")
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def read_failure(exc: BaseException) -> tuple[str, str]:
    """(outcome, reason) for an upstream read that failed mid-response."""
    if isinstance(exc, TimeoutError):  # before OSError: it is one (aiohttp's read timeout too)
        return ("timeout", "upstream read timed out mid-response")
    return ("upstream_error", f"upstream connection lost mid-response: {type(exc).__name__}: {exc}")


async def _salvage(
    response: web.StreamResponse, stream_tap: ResponseCopy | StrippedCopy | None, failure: tuple[str, str]
) -> tuple[str, str]:
    """The upstream failed mid-stream: pass on bytes the tap still held back."""
    if stream_tap is not None:
        held = stream_tap.close(time.perf_counter(), complete=False)
        if held:
            with contextlib.suppress(ConnectionError):
                await response.write(held)
    return failure


@dataclass(slots=True)
class _Call:
    """A logged call in flight. Stays in this process: it holds the client's credentials (for redaction)."""

    request_id: str
    started: float
    started_wall: float
    method: str
    path: str
    upstream: str  # the base URL the call went to (its route's, or upstream.url)
    api: str | None
    secrets: tuple[str, ...]  # every credential the request carried (credentials.request_secrets)
    key_hash: str | None
    tag_headers: list[str] | None
    user_header: str | None
    body: bytes = b""
    facts: RequestFacts | None = None
    done: bool = False

    def capture(
        self,
        failure: tuple[str, str] | None,
        *,
        status: int | None = None,
        upstream: aiohttp.ClientResponse | None = None,
        event_stream: bool = False,
        headers_at: float | None = None,
        copy: ResponseCopy | None = None,
    ) -> Capture:
        """The hand-off to the writer: the call as read off the wire, with no key in it."""
        self.done = True
        chunks, times = copy.reads() if copy is not None else ([], None)
        return Capture(
            request_id=self.request_id,
            started_wall=self.started_wall,
            started=self.started,
            method=self.method,
            path=self.path,
            upstream=self.upstream,
            api=self.api,
            api_key_hash=self.key_hash,
            secrets=fingerprints(self.secrets) if self.secrets else (),
            tag_headers=self.tag_headers,
            user_header=self.user_header,
            request_body=self.body,
            status=upstream.status if upstream is not None else status,
            upstream_request_id=_upstream_request_id(upstream) if upstream is not None else None,
            encoding=upstream.headers.get("Content-Encoding") if upstream is not None else None,
            event_stream=event_stream,
            headers_at=headers_at,
            chunks=chunks,
            times=times,
            finished=time.perf_counter(),
            overflow=copy.overflow if copy is not None else False,
            failure=failure,
            gap_at=copy.gap_at if copy is not None else -1,
            copy_note=BUDGET_NOTE if copy is not None and copy.over_budget else None,
        )


def _not_started(capture: Capture) -> None:
    raise RuntimeError("the forwarder has no recorder yet: the app's cleanup contexts have not run")


class Forwarder:
    """Holds what every request needs, resolved once: upstream base, timeouts, session, recorder.
    `handle` is the catch-all route's handler itself; the app's cleanup contexts set `session` and
    `submit` (the recorder's)."""

    def __init__(self, config: Config) -> None:
        self._routes = Routes(config)
        self._default = self._routes.default
        self._routed = bool(self._routes.routes)
        self._max_body = config.server.max_body_size
        self._body_timeout = config.server.body_timeout
        self._all_paths = config.logging.all_paths
        self._inject_usage = config.logging.inject_stream_usage
        self._copies = CopyBudget(config.server.copy_budget_mb * 1024 * 1024, release_free_memory)
        self.submit: Submit = _not_started
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The forwarding route's handler: read the body, send it upstream, relay the answer. The router
        has already refused CONNECT and targets not in origin form (`policy.refusal`). One coroutine from
        the request to the relay: each level of calls costs every request a little."""
        headers, reason = forwardable_request_headers(request.headers)
        if reason is not None:
            return json_error(400, reason, "invalid_request_error", "proxy_refused")
        method = request.method
        target = request.raw_path
        route = self._default
        if self._routed:
            route, target = self._routes.pick(target)
        api = api_of(method, request.path)
        call = self._call(request, method, api, route.url) if api is not None or self._all_paths else None
        try:
            if request.content_length is not None and request.content_length > self._max_body:
                return self._too_large(call)
            try:
                if request.content.is_eof():  # the usual case: the body came with the headers
                    body = await request.read()
                else:
                    async with asyncio.timeout(self._body_timeout):
                        body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._too_large(call)
            except TimeoutError:
                return await self._body_late(request, call)
            send = body
            if call is not None and api is not None:
                call.body = body
                # only a streaming request can need usage injected: anything else is read by the writer
                if self._inject_usage and api in USAGE_INJECTED_APIS and b'"stream"' in body:
                    call.facts = inspect_request(body, inject_usage=True)
                    send = call.facts.body

            assert self.session is not None
            try:
                upstream = await self.session.request(
                    method,
                    URL(route.url + target, encoded=True),
                    data=send if send else None,
                    headers=headers,
                    allow_redirects=False,
                    skip_auto_headers=SKIP_AUTO_HEADERS,
                    timeout=route.timeout,
                )
            except (TimeoutError, aiohttp.ServerTimeoutError):
                return self._failed(call, route.url, 504, "timeout", "upstream timed out before responding")
            except aiohttp.ClientConnectorError as exc:
                return self._failed(call, route.url, 502, "unreachable", f"upstream unreachable: {exc}")
            except aiohttp.ClientError as exc:
                message = f"upstream failed before responding: {type(exc).__name__}: {exc}"
                return self._failed(call, route.url, 502, "upstream_error", message)

            try:
                if call is None:
                    return await self._relay_unlogged(request, upstream)
                return await self._relay_logged(request, upstream, call)
            finally:
                upstream.release()
        except asyncio.CancelledError:
            if call is not None and not call.done:
                self.submit(call.capture(DISCONNECTED))
            raise

    @staticmethod
    def _call(request: web.Request, method: str, api: str | None, upstream: str) -> _Call:
        started = time.perf_counter()
        headers = request.headers
        key = bearer_key(headers)
        target = request.raw_path
        secrets = request_secrets(headers, target)
        path = redact_query(target)
        return _Call(
            new_request_id(),
            started,
            time.time(),
            method[:16],
            redact_secrets(path, secrets) if secrets else path,  # a key may sit in the path itself
            upstream,
            api,
            secrets,
            key_fingerprint(key) if key is not None else None,
            headers.getall("X-Ledger-Tags") if "X-Ledger-Tags" in headers else None,
            headers.get("X-Ledger-User"),
        )

    def _too_large(self, call: _Call | None) -> web.Response:
        message = f"request body is larger than the proxy's limit of {self._max_body} bytes"
        request_id = None
        if call is not None:
            # refused by the proxy itself: the upstream never saw it
            self.submit(call.capture(("rejected", message), status=413))
            request_id = call.request_id
        return json_error(413, message, "invalid_request_error", "request_too_large", request_id)

    async def _body_late(self, request: web.Request, call: _Call | None) -> web.StreamResponse:
        """A body still incomplete after server.body_timeout (a slow or stalled client): 408, and the
        connection is closed once it is sent (aiohttp would otherwise go on reading the body)."""
        message = f"request body not received within {self._body_timeout:g}s (server.body_timeout)"
        request_id = None
        if call is not None:
            self.submit(call.capture(("rejected", message), status=408))
            request_id = call.request_id
        response = json_error(408, message, "invalid_request_error", "request_timeout", request_id)
        response.force_close()
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write_eof()
        if request.transport is not None:
            request.transport.close()
        return response

    def _failed(self, call: _Call | None, upstream: str, status: int, outcome: str, message: str) -> web.Response:
        request_id = None
        if call is not None:
            self.submit(call.capture((outcome, message)))
            request_id = call.request_id
            if call.secrets:
                message = redact_secrets(message, call.secrets)
        if outcome != "upstream_error":  # unreachable, timeout: the operator wants to know
            _upstream_trouble.log(logging.WARNING, "%s: %s", upstream, message)
        code = "upstream_timeout" if status == 504 else "upstream_unreachable"
        return json_error(status, message, "proxy_error", code, request_id)

    @staticmethod
    def _client_tap(
        call: _Call, upstream: aiohttp.ClientResponse, event_stream: bool, copy: ResponseCopy
    ) -> ResponseCopy | StrippedCopy:
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
        return StrippedCopy(copy, strip) if strip.stripping else copy

    async def _relay_unlogged(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        headers = forwardable_response_headers(upstream.headers)
        response = relay_response(upstream, headers)
        try:
            failure = await self._pump(request, upstream, response, None)
        except asyncio.CancelledError:
            upstream.close()
            raise
        self._after_failure(request, upstream, failure)
        return response

    async def _relay_logged(
        self, request: web.Request, upstream: aiohttp.ClientResponse, call: _Call
    ) -> web.StreamResponse:
        """Pass the response on read by read and keep the reads; the writer parses them. A call on a path
        no parser reads (`all_paths` logging) keeps its body only when it is an error, for the summary."""
        headers_at = time.perf_counter()
        event_stream = upstream.headers.get("Content-Type", "")[:17].lower() == "text/event-stream"
        headers = forwardable_response_headers(upstream.headers)
        headers[REQUEST_ID_HEADER] = call.request_id
        keep = call.api is not None or upstream.status >= 400
        copy = ResponseCopy(
            [] if event_stream and upstream.status < 300 and call.api is not None else None, self._copies
        )
        tap: ResponseCopy | StrippedCopy | None = self._client_tap(call, upstream, event_stream, copy) if keep else None
        if tap is not None and tap is not copy:
            headers.popall("Content-Length", None)  # the client gets fewer bytes than the upstream sent
        response = relay_response(upstream, headers)
        try:
            failure = await self._pump(request, upstream, response, tap)
        except asyncio.CancelledError:  # the client went away while we waited on the upstream
            upstream.close()
            self._submit_relayed(call, upstream, event_stream, headers_at, copy, DISCONNECTED)
            raise
        finally:
            copy.release()  # after the hand-off this does nothing; on an unexpected error it frees the budget
        self._after_failure(request, upstream, failure)
        self._submit_relayed(call, upstream, event_stream, headers_at, copy, failure)
        return response

    def _submit_relayed(
        self,
        call: _Call,
        upstream: aiohttp.ClientResponse,
        event_stream: bool,
        headers_at: float,
        copy: ResponseCopy,
        failure: tuple[str, str] | None,
    ) -> None:
        self.submit(
            call.capture(failure, upstream=upstream, event_stream=event_stream, headers_at=headers_at, copy=copy)
        )

    @classmethod
    def _after_failure(
        cls, request: web.Request, upstream: aiohttp.ClientResponse, failure: tuple[str, str] | None
    ) -> None:
        if failure is not None:
            upstream.close()
            if failure[0] != "client_disconnected":
                cls._abort(request)
            if failure[0] == "timeout":
                _upstream_trouble.log(logging.WARNING, "%s: %s", upstream.url.origin(), failure[1])

    @staticmethod
    async def _pump(
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        tap: ResponseCopy | StrippedCopy | None,
    ) -> tuple[str, str] | None:
        """Copy the body to the client read by read; returns (outcome, reason) if either side failed.

        The tap sees every read with its arrival time and decides what the client gets of it."""
        try:
            await response.prepare(request)
        except ConnectionError:
            return DISCONNECTED
        content = upstream.content
        while True:
            try:
                chunk = await read_available(content)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                return await _salvage(response, tap, read_failure(exc))
            if tap is not None:
                now = time.perf_counter()
                out = tap.feed(chunk, now) if chunk else tap.close(now)
            else:
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


def relay_response(upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]) -> web.StreamResponse:
    """The client's response: headers sent at once while the upstream is still sending (a stream, a slow
    body), or with the body when all of it is already here."""
    kind = WholeBodyResponse if upstream.content.is_eof() else web.StreamResponse
    return kind(status=upstream.status, reason=upstream.reason, headers=headers)


def _upstream_request_id(upstream: aiohttp.ClientResponse) -> str | None:
    for name in UPSTREAM_ID_HEADERS:
        value = upstream.headers.get(name)
        if value:
            return value[:200]
    return None
