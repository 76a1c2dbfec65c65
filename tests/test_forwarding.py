"""Forwarding through the proxy on real sockets: what the upstream receives, what the client gets back,
and the row each call leaves (on SQLite and PostgreSQL).

Header tests talk raw HTTP/1.1 on both sides where a client library would add or drop headers itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from sqlalchemy import text
from yarl import URL

from proxy import __version__
from proxy.relay.request_ids import new_request_id
from proxy.web.app import create_app

from .conftest import Ledger, make_config, start_ledger
from .helpers import raw_upstream
from .payloads import HTML_502, MODELS_LIST, OPENAI_BASIC, midstream_error_stream
from .upstream import FakeUpstream, json_reply, sse_reply

KEY = "sk-proj-Q7vY3kLm9TzX2wPa8RbN5cHd"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()[:16]
CHAT = "/v1/chat/completions"
HOP_BY_HOP = (
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
)


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def raw_http(port: int, request: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send raw bytes (the request must ask `Connection: close`) and read the whole response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines[1:])]
    assert not any(n.lower() == "transfer-encoding" and "chunked" in v for n, v in headers), (
        "use Content-Length"
    )
    return int(lines[0].split()[1]), headers, body


@contextlib.asynccontextmanager
async def proxy_for(
    upstream_url: str, database_url: str, tmp_path: Path, **sections: Any
) -> AsyncIterator[Ledger]:
    ledger = await start_ledger(make_config(upstream_url, database_url, tmp_path, **sections))
    try:
        yield ledger
    finally:
        await ledger.stop()


def headers_named(items: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in items if key.lower() == name]


# --- the request ----------------------------------------------------------------------------------


async def test_method_path_query_body_and_headers_are_forwarded_unchanged(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    body = b'{ "model" :"gpt-4o",\n  "messages":[{"role":"user","content":"h\\u00e9 \xe2\x82\xac"}], "z":1 }'
    target = "/openai/deployments/my%20dep/chat/completions?api-version=2024-10-21&x=%2F&y=a+b&y=c"
    async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as session:
        headers = [
            ("Authorization", f"Bearer {KEY}"),
            ("Content-Type", "application/json"),
            ("OpenAI-Organization", "org-123"),
            ("X-Custom", "one"),
            ("X-Custom", "two"),
            ("X-Ledger-User", "alice"),
            ("X-Ledger-Tags", "team=search"),
            ("X-Ledger-Anything", "private"),
            ("Accept-Encoding", "identity"),
        ]
        url = URL(ledger.url + target, encoded=True)  # keep %2F as sent
        async with session.post(url, data=body, headers=headers) as response:
            assert response.status == 200
            got = await response.read()
    assert got == orjson.dumps(OPENAI_BASIC)
    [received] = upstream.requests
    assert received.method == "POST"
    assert received.path_qs == target
    assert received.body == body
    assert received.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert received.headers["authorization"] == f"Bearer {KEY}"
    assert received.headers["openai-organization"] == "org-123"
    assert received.headers["content-type"] == "application/json"
    assert received.headers["accept-encoding"] == "identity"
    assert headers_named(received.header_items, "x-custom") == ["one", "two"]
    assert not [name for name in received.headers if name.startswith("x-ledger-")]
    assert "user-agent" not in received.headers  # the proxy adds none of its own
    assert int(received.headers["content-length"]) == len(body)
    row = await ledger.row()
    assert row["path"] == target
    assert row["requested_model"] == "gpt-4o"


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_forwarded(ledger: Ledger, upstream: FakeUpstream, method: str) -> None:
    data = b"payload" if method not in ("GET", "HEAD") else None
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, ledger.url + "/v1/files/file-1?purpose=x", data=data) as response,
    ):
        assert response.status == 200
        body = await response.read()
        assert response.headers["Content-Length"] == str(len(orjson.dumps(OPENAI_BASIC)))
    assert body == (b"" if method == "HEAD" else orjson.dumps(OPENAI_BASIC))
    [received] = upstream.requests
    assert (received.method, received.path_qs) == (method, "/v1/files/file-1?purpose=x")
    assert received.body == (data or b"")


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses(ledger: Ledger, upstream: FakeUpstream, status: int) -> None:
    async def empty(request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(status=status, headers={"ETag": '"v1"'})

    upstream.add("empty", empty)
    async with (
        aiohttp.ClientSession(headers={"X-Fake-Scenario": "empty"}) as session,
        session.get(ledger.url + "/v1/files/file-1") as response,
    ):
        assert response.status == status
        assert response.headers["ETag"] == '"v1"'
        assert await response.read() == b""


async def test_hop_by_hop_request_headers_are_dropped(ledger: Ledger, upstream: FakeUpstream) -> None:
    body = b'{"model":"gpt-4o","messages":[]}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: client.example\r\n"
        b"Connection: close, Upgrade, X-Hop-Secret\r\n"
        b"X-Hop-Secret: do-not-forward\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\n"
        b"X-End-To-End: kept\r\n"
        b"Content-Type: application/json\r\n\r\n" + chunked
    )
    status, headers, got = await raw_http(ledger.port, request)
    assert status == 200
    assert got == orjson.dumps(OPENAI_BASIC)
    [received] = upstream.requests
    names = {name.lower() for name, _ in received.header_items}
    assert received.body == body
    assert "x-hop-secret" not in names
    for name in (
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "transfer-encoding",
    ):
        assert name not in names, name
    assert received.headers.get("connection", "").lower() in ("", "keep-alive")  # aiohttp's own, if any
    assert received.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert received.headers["x-end-to-end"] == "kept"
    assert received.headers["authorization"] == f"Bearer {KEY}"
    assert int(received.headers["content-length"]) == len(body)
    row = await ledger.row()
    assert headers_named(headers, "x-ledger-request-id") == [row["request_id"]]


# --- the response ---------------------------------------------------------------------------------

RAW_RESPONSE_BODY = orjson.dumps(OPENAI_BASIC)
RAW_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: keep-alive, X-Resp-Hop\r\n"
    b"X-Resp-Hop: secret\r\n"
    b"Keep-Alive: timeout=5, max=100\r\n"
    b"Proxy-Authenticate: Basic realm=upstream\r\n"
    b"Trailer: X-Checksum\r\n"
    b"Upgrade: h2c\r\n"
    b"Server: upstream/1.0\r\n"
    b"Date: Mon, 10 Mar 2025 01:31:23 GMT\r\n"
    b"Set-Cookie: a=1; Path=/\r\n"
    b"Set-Cookie: b=2; Path=/\r\n"
    b"X-Request-Id: req_8f2b\r\n"
    b"OpenAI-Processing-Ms: 812\r\n"
    b"X-RateLimit-Remaining-Tokens: 29000\r\n"
    b"\r\n" % len(RAW_RESPONSE_BODY)
) + RAW_RESPONSE_BODY


async def test_response_status_headers_and_body_pass_back(database_url: str, tmp_path: Path) -> None:
    async with (
        raw_upstream(RAW_RESPONSE) as (url, received),
        proxy_for(url, database_url, tmp_path) as ledger,
    ):
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        status, headers, body = await raw_http(ledger.port, request)
        row = await ledger.row()
    assert len(received) == 1
    assert status == 200
    assert body == RAW_RESPONSE_BODY
    head = RAW_RESPONSE.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
    upstream_headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in head)]
    for name, value in upstream_headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower == "x-resp-hop":
            if lower != "connection":  # the proxy's own server writes its own Connection header
                assert not headers_named(headers, lower), name
            continue
        assert value in headers_named(headers, lower), name
    assert headers_named(headers, "set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert headers_named(headers, "content-length") == [str(len(RAW_RESPONSE_BODY))]
    assert headers_named(headers, "server") == ["upstream/1.0"]
    assert not any("x-resp-hop" in value.lower() for value in headers_named(headers, "connection"))
    request_id = headers_named(headers, "x-ledger-request-id")
    assert request_id == [row["request_id"]]
    assert uuid.UUID(request_id[0]).version == 7  # time-ordered (UUIDv7)
    assert row["upstream_request_id"] == "req_8f2b"
    assert row["completion_id"] == OPENAI_BASIC["id"]


@pytest.mark.parametrize("status", [201, 299, 404, 418, 503])
async def test_any_status_passes_back(ledger: Ledger, upstream: FakeUpstream, status: int) -> None:
    payload = {"status": status}
    upstream.add("s", json_reply(payload, status=status, headers={"X-Upstream": "yes"}))
    async with (
        aiohttp.ClientSession() as session,
        session.get(ledger.url + "/v1/anything", headers={"X-Fake-Scenario": "s"}) as response,
    ):
        assert response.status == status
        assert response.headers["X-Upstream"] == "yes"
        assert await response.read() == orjson.dumps(payload)
        assert "X-Ledger-Request-Id" not in response.headers  # not logged: no row id to give
    assert await ledger.rows() == []


def gzip_scenario(
    payload: bytes,
) -> tuple[bytes, Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]]:
    compressed = gzip.compress(payload, mtime=0)

    async def scenario(request: web.Request, _body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Encoding": "gzip",
                "Content-Type": "application/json",
                "Content-Length": str(len(compressed)),
            }
        )
        await response.prepare(request)
        for start in range(0, len(compressed), 97):  # several reads on the proxy side
            await response.write(compressed[start : start + 97])
        await response.write_eof()
        return response

    return compressed, scenario


async def test_gzip_response_reaches_the_client_intact_and_is_parsed(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    payload = orjson.dumps(OPENAI_BASIC)
    compressed, scenario = gzip_scenario(payload)
    upstream.add("gz", scenario)
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(
            ledger.url + CHAT,
            json={"model": "gpt-4o", "messages": []},
            headers={"X-Fake-Scenario": "gz", "Accept-Encoding": "gzip"},
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(compressed))
        assert await response.read() == compressed
    assert upstream.requests[0].headers["accept-encoding"] == "gzip"
    row = await ledger.row()
    assert row["outcome"] == "ok"
    assert row["completion_id"] == OPENAI_BASIC["id"]
    assert row["prompt_tokens"] == OPENAI_BASIC["usage"]["prompt_tokens"]
    assert [c["finish_reason"] for c in row["choices"]] == ["stop"]


async def test_gzip_response_through_the_openai_client(ledger: Ledger, upstream: FakeUpstream) -> None:
    _, scenario = gzip_scenario(orjson.dumps(OPENAI_BASIC))
    upstream.add("gz", scenario)
    client = openai.AsyncOpenAI(
        base_url=ledger.url + "/v1", api_key=KEY, max_retries=0, default_headers={"X-Fake-Scenario": "gz"}
    )
    async with client:
        completion = await client.chat.completions.create(model="gpt-4o", messages=[])
    assert completion.id == OPENAI_BASIC["id"]
    assert (await ledger.row())["total_tokens"] == OPENAI_BASIC["usage"]["total_tokens"]


async def test_corrupt_gzip_is_passed_through_and_logged_unparsed(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    garbage = b"\x1f\x8b\x08\x00not really gzip at all"
    upstream.add("bad", json_reply(None, raw=garbage, headers={"Content-Encoding": "gzip"}))
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(ledger.url + CHAT, json={"model": "m"}, headers={"X-Fake-Scenario": "bad"}) as response,
    ):
        assert await response.read() == garbage
    row = await ledger.row()
    assert row["outcome"] == "unparsed"
    assert row["status_code"] == 200
    assert "decoded" in row["error"]


# --- what is logged and what is not ---------------------------------------------------------------


NOT_LOGGED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/moderations"),
    ("GET", CHAT),  # not a POST: not a completion
    ("POST", "/v1/chat/completions/extra"),
    ("POST", "/v1/responses/resp_123/cancel"),
    ("GET", "/v1/responses/resp_123"),
    ("POST", "/v1/responses/input_tokens"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/messages/batches"),
    ("POST", "/v1/threads/thread_1/messages"),  # OpenAI Assistants, not Anthropic Messages
    ("POST", "/v1/embeddings/extra"),
    ("GET", "/v1/embeddings"),
]


async def test_paths_no_parser_reads_are_forwarded_without_a_row(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("models", json_reply(MODELS_LIST))
    async with aiohttp.ClientSession(headers={"X-Fake-Scenario": "models"}) as session:
        for method, path in NOT_LOGGED:
            async with session.request(method, ledger.url + path, json={"input": "x"}) as response:
                assert response.status == 200
                assert await response.read() == orjson.dumps(MODELS_LIST)
    assert [(r.method, r.path_qs) for r in upstream.requests] == NOT_LOGGED
    assert await ledger.rows() == []


async def test_all_paths_logs_every_call(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> None:
    upstream.add("models", json_reply(MODELS_LIST, headers={"X-Request-Id": "req_models"}))
    async with proxy_for(upstream.url, database_url, tmp_path, logging={"all_paths": True}) as ledger:
        async with (
            aiohttp.ClientSession(headers={"X-Fake-Scenario": "models"}) as session,
            session.get(
                ledger.url + "/v1/models?limit=2",
                headers={"Authorization": f"Bearer {KEY}", "X-Ledger-User": "bob"},
            ) as response,
        ):
            assert await response.read() == orjson.dumps(MODELS_LIST)
            request_id = response.headers["X-Ledger-Request-Id"]
        row = await ledger.row()
    assert row["request_id"] == request_id
    assert (row["method"], row["path"], row["status_code"], row["outcome"]) == (
        "GET",
        "/v1/models?limit=2",
        200,
        "ok",
    )
    assert (row["api_key_hash"], row["user"], row["upstream_request_id"]) == (KEY_HASH, "bob", "req_models")
    assert row["stream"] is False
    for column in ("requested_model", "completion_id", "model", "prompt_tokens", "cost", "usage", "error", "api"):
        assert row[column] is None, column
    assert row["choices"] == []


async def test_redirects_are_passed_back_not_followed(ledger: Ledger, upstream: FakeUpstream) -> None:
    async def redirect(request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/v2/chat/completions"}, text="moved")

    upstream.add("redirect", redirect)
    async with aiohttp.ClientSession(headers={"X-Fake-Scenario": "redirect"}) as session:
        async with session.post(ledger.url + CHAT, json={"model": "m"}, allow_redirects=False) as response:
            assert response.status == 302
            assert response.headers["Location"] == "/v2/chat/completions"
            assert await response.read() == b"moved"
        async with session.get(ledger.url + "/v1/models", allow_redirects=False) as response:
            assert response.status == 302
    assert [r.path_qs for r in upstream.requests] == [CHAT, "/v1/models"]
    row = await ledger.row()
    assert row["status_code"] == 302
    assert row["outcome"] == "upstream_error"  # a chat call that got no completion
    assert row["error"] == "HTTP 302: moved"


async def test_html_error_page_passes_through_and_is_logged(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("html", json_reply(None, status=502, raw=HTML_502, content_type="text/html"))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            ledger.url + CHAT, json={"model": "gpt-4o"}, headers={"X-Fake-Scenario": "html"}
        ) as response,
    ):
        assert response.status == 502
        assert response.headers["Content-Type"].startswith("text/html")
        assert await response.read() == HTML_502
    row = await ledger.row()
    assert (row["status_code"], row["outcome"]) == (502, "upstream_error")
    assert row["error"].startswith("HTTP 502: <html> <head><title>502 Bad Gateway</title></head>")
    assert "cloudflare" in row["error"]


# --- failures of the upstream and of the request ------------------------------------------------------


def assert_proxy_error(body: bytes, status_code: str) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == status_code
    assert error["type"] == "proxy_error"
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


async def test_unreachable_upstream_gives_502_and_a_row(database_url: str, tmp_path: Path) -> None:
    port = closed_port()
    async with proxy_for(f"http://127.0.0.1:{port}", database_url, tmp_path) as ledger:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                ledger.url + CHAT, json={"model": "gpt-4o"}, headers={"Authorization": f"Bearer {KEY}"}
            ) as response,
        ):
            assert response.status == 502
            assert response.content_type == "application/json"
            assert_proxy_error(await response.read(), "upstream_unreachable")
            request_id = response.headers["X-Ledger-Request-Id"]
        client = openai.AsyncOpenAI(base_url=ledger.url + "/v1", api_key=KEY, max_retries=0)
        async with client:
            with pytest.raises(openai.InternalServerError) as raised:
                await client.chat.completions.create(model="gpt-4o", messages=[])
        assert raised.value.status_code == 502
        rows = await ledger.rows()
    assert len(rows) == 2
    row = rows[0]
    assert row["request_id"] == request_id
    assert (row["outcome"], row["status_code"]) == ("unreachable", None)
    assert row["error"].startswith("upstream unreachable")
    assert row["upstream"] == f"http://127.0.0.1:{port}"
    assert (row["requested_model"], row["api_key_hash"]) == ("gpt-4o", KEY_HASH)
    assert row["ttft_ms"] is None
    assert row["duration_ms"] >= 0
    assert row["completion_id"] is None
    assert rows[1]["outcome"] == "unreachable"


async def test_upstream_hanging_before_headers_gives_504(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    async def hang(request: web.Request, _body: bytes) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    upstream.add("hang", hang)
    async with proxy_for(upstream.url, database_url, tmp_path, upstream={"read_timeout": 0.3}) as ledger:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                ledger.url + CHAT, json={"model": "gpt-4o"}, headers={"X-Fake-Scenario": "hang"}
            ) as response,
        ):
            assert response.status == 504
            assert_proxy_error(await response.read(), "upstream_timeout")
        row = await ledger.row()
    assert (row["outcome"], row["status_code"]) == ("timeout", None)
    assert row["error"] == "upstream timed out before responding"
    assert 250 <= row["duration_ms"] < 5000


async def test_upstream_hanging_mid_body_cuts_the_client_off(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    async def half(request: web.Request, _body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000", "Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"id": "chatcmpl-half", ')
        await asyncio.sleep(30)
        return response

    upstream.add("half", half)
    async with proxy_for(upstream.url, database_url, tmp_path, upstream={"read_timeout": 0.3}) as ledger:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                ledger.url + CHAT, json={"model": "gpt-4o"}, headers={"X-Fake-Scenario": "half"}
            ) as response,
        ):
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        row = await ledger.row()
    assert (row["outcome"], row["status_code"]) == ("timeout", 200)
    assert row["error"] == "upstream read timed out mid-response"


async def test_a_body_already_received_goes_out_with_its_headers_in_one_write(
    ledger: Ledger, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One send for headers and body instead of two: the client gets one segment (and the proxy makes one
    syscall less per call)."""
    sent: list[bytes] = []
    original_write, original_writelines = StreamWriter._write, StreamWriter._writelines

    def from_proxy(writer: StreamWriter) -> bool:
        transport = writer.transport
        return transport is not None and transport.get_extra_info("sockname")[1] == ledger.port

    def write(self: StreamWriter, chunk: Any) -> None:
        if from_proxy(self):
            sent.append(bytes(chunk))
        original_write(self, chunk)

    def writelines(self: StreamWriter, chunks: Any) -> None:
        if from_proxy(self):
            sent.append(b"".join(chunks))
        original_writelines(self, chunks)

    monkeypatch.setattr(StreamWriter, "_write", write)
    monkeypatch.setattr(StreamWriter, "_writelines", writelines)
    async with aiohttp.ClientSession() as session, session.post(ledger.url + CHAT, json={"model": "gpt-4o"}) as r:
        body = await r.read()
    assert orjson.loads(body)["id"] == OPENAI_BASIC["id"]
    assert len(sent) == 1, [len(chunk) for chunk in sent]
    assert sent[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert sent[0].endswith(body)
    assert (await ledger.row())["completion_id"] == OPENAI_BASIC["id"]


async def test_headers_of_a_body_still_coming_reach_the_client_at_once(ledger: Ledger, upstream: FakeUpstream) -> None:
    async def slow_body(request: web.Request, _body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(orjson.dumps(OPENAI_BASIC))
        await response.prepare(request)
        await asyncio.sleep(0.6)
        await response.write(orjson.dumps(OPENAI_BASIC))
        return response

    upstream.add("slow-body", slow_body)
    began = time.perf_counter()
    async with (
        aiohttp.ClientSession() as session,
        session.post(ledger.url + CHAT, json={"model": "gpt-4o"}, headers={"X-Fake-Scenario": "slow-body"}) as r,
    ):
        headers_after = time.perf_counter() - began
        body = await r.read()
    assert headers_after < 0.4  # not held back until the body is complete
    assert time.perf_counter() - began >= 0.6
    assert orjson.loads(body) == OPENAI_BASIC
    assert (await ledger.row())["completion_id"] == OPENAI_BASIC["id"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_request_body_gives_413_without_an_upstream_call(
    upstream: FakeUpstream, database_url: str, tmp_path: Path, chunked: bool
) -> None:
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"x" * 5000 + b'"}]}'

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    async with proxy_for(upstream.url, database_url, tmp_path, server={"max_body_size": 4096}) as ledger:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                ledger.url + CHAT,
                data=pieces() if chunked else body,
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 413
            error = orjson.loads(await response.read())["error"]
            request_id = response.headers["X-Ledger-Request-Id"]
        row = await ledger.row()
    assert upstream.requests == []
    assert error == {
        "message": "request body is larger than the proxy's limit of 4096 bytes",
        "type": "invalid_request_error",
        "code": "request_too_large",
    }
    assert row["request_id"] == request_id
    assert (row["status_code"], row["outcome"], row["error"]) == (413, "rejected", error["message"])
    assert row["api_key_hash"] == KEY_HASH


async def test_body_at_the_limit_is_forwarded(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    body = b'{"model":"m","pad":"' + b"y" * 100 + b'"}'
    async with proxy_for(upstream.url, database_url, tmp_path, server={"max_body_size": len(body)}) as ledger:
        async with aiohttp.ClientSession() as session, session.post(ledger.url + CHAT, data=body) as response:
            assert response.status == 200
        assert (await ledger.row())["outcome"] == "ok"
    assert upstream.requests[0].body == body


# --- the proxy's own endpoints ------------------------------------------------------------------------


async def test_health(ledger: Ledger, upstream: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as session, session.get(ledger.url + "/_ledger/health") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        health = orjson.loads(await response.read())
    assert health["version"] == __version__
    assert health["database"]["reachable"] is True
    assert health["status"] == "ok"
    assert upstream.requests == []


async def test_health_reports_an_unreachable_database(upstream: FakeUpstream, tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'ledger.db'}"
    config = make_config(upstream.url, database, tmp_path)
    runner = web.AppRunner(create_app(config, migrate=False), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/_ledger/health") as response,
        ):
            assert response.status == 200
            health = orjson.loads(await response.read())
    finally:
        await runner.cleanup()
    assert health["database"]["reachable"] is False
    assert health["status"] == "degraded"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/_ledger/x"),
        ("POST", "/_ledger/chat/completions"),
        ("GET", "/_ledger/static/other.css"),  # /_ledger/ itself is the dashboard
        ("DELETE", "/_ledger/health/extra"),
        ("GET", "/%5Fledger/x"),  # the reserved prefix is matched decoded, as aiohttp's routes are
        ("POST", "/_led%67er/chat/completions"),
    ],
)
async def test_unknown_ledger_paths_are_404_and_not_forwarded(
    ledger: Ledger, upstream: FakeUpstream, method: str, path: str
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, URL(ledger.url + path, encoded=True), json={}) as response,
    ):
        assert response.status == 404
        error = orjson.loads(await response.read())["error"]
    assert error["code"] == "not_found"
    assert upstream.requests == []
    assert await ledger.rows() == []


async def test_the_reserved_prefix_is_exact_and_matched_decoded(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("models", json_reply(MODELS_LIST))
    async with aiohttp.ClientSession() as session:
        async with session.get(URL(ledger.url + "/%5Fledger/health", encoded=True)) as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ok"
        for path in ("/_ledgerx/models", "/v1/_ledger/models", "/_ledger"):
            async with session.get(ledger.url + path, headers={"X-Fake-Scenario": "models"}) as response:
                assert response.status == 200, path
                assert await response.json() == MODELS_LIST
    assert [request.path_qs for request in upstream.requests] == ["/_ledgerx/models", "/v1/_ledger/models", "/_ledger"]


# --- the API key is never stored ---------------------------------------------------------------------


def files_under(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def echo_key_scenarios(upstream: FakeUpstream) -> None:
    """Upstreams that repeat the caller's key back, as some providers' error messages do."""

    def presented(request: web.Request) -> str:
        return (
            request.headers.get("Authorization", "").removeprefix("Bearer ")
            or request.headers.get("api-key", "")
            or request.headers.get("x-api-key", "")
        )

    async def error_401(request: web.Request, _body: bytes) -> web.StreamResponse:
        body = {
            "error": {
                "message": f"Incorrect API key provided: {presented(request)}.",
                "type": "auth",
                "code": "invalid_api_key",
            }
        }
        return web.json_response(body, status=401)

    async def error_200(request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.json_response({"error": {"message": f"key {presented(request)} is disabled", "code": 403}})

    async def html_500(request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(
            status=500, text=f"<h1>bad key {presented(request)}</h1>", content_type="text/html"
        )

    async def stream_error(request: web.Request, body: bytes) -> web.StreamResponse:
        data = midstream_error_stream().replace(
            b"Provider disconnected unexpectedly", f"key {presented(request)} revoked".encode()
        )
        return await sse_reply(data)(request, body)

    upstream.add("e401", error_401)
    upstream.add("e200", error_200)
    upstream.add("html", html_500)
    upstream.add("stream", stream_error)


async def test_the_raw_key_is_stored_nowhere(
    ledger: Ledger,
    upstream: FakeUpstream,
    database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    echo_key_scenarios(upstream)
    calls = [
        ({"Authorization": f"Bearer {KEY}"}, "basic", {}),
        ({"Authorization": f"Bearer {KEY}"}, "e401", {}),
        ({"Authorization": f"Bearer {KEY}"}, "e200", {}),
        ({"Authorization": f"Bearer {KEY}"}, "html", {}),
        ({"Authorization": f"Bearer {KEY}"}, "stream", {"stream": True}),
        ({"api-key": KEY}, "e401", {}),
        ({"x-api-key": KEY}, "e401", {}),
    ]
    async with aiohttp.ClientSession() as session:
        for headers, scenario, extra in calls:
            async with session.post(
                ledger.url + CHAT,
                json={"model": "gpt-4o", "messages": [], **extra},
                headers={**headers, "X-Fake-Scenario": scenario},
            ) as response:
                await response.read()
    rows = await ledger.rows()
    assert len(rows) == len(calls)
    assert [row["api_key_hash"] for row in rows] == [KEY_HASH] * len(calls)
    assert all(row["error"] for row in rows[1:])
    assert all("[redacted]" in row["error"] for row in rows[1:]), [row["error"] for row in rows]
    assert all(
        KEY
        in (
            r.headers.get("authorization", "") + r.headers.get("api-key", "") + r.headers.get("x-api-key", "")
        )
        for r in upstream.requests
    )

    needles = (KEY.encode(), KEY.encode("utf-16-le"), KEY[3:].encode())
    if database_url.startswith("sqlite"):
        db_file = Path(database_url.split(":///", 1)[1])
        files = files_under(db_file.parent)  # the database, its -wal and -shm files, the spool
        assert {db_file.name, db_file.name + "-wal"} <= {path.name for path in files}
        for path, data in files.items():
            assert not any(needle in data for needle in needles), path
        assert KEY_HASH.encode() in b"".join(files.values())
    else:
        async with ledger.engine.connect() as conn:
            tables = (
                (await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")))
                .scalars()
                .all()
            )
            assert "completions" in tables
            dump = []
            for table in tables:
                dump += (
                    (await conn.execute(text(f'SELECT row_to_json(t)::text FROM "{table}" t')))
                    .scalars()
                    .all()
                )
        text_dump = "\n".join(dump)
        assert KEY_HASH in text_dump
        assert KEY[3:] not in text_dump
    assert KEY[3:] not in caplog.text


def test_request_ids_are_distinct_time_ordered_uuid7s_also_after_a_fork() -> None:
    before = datetime.now(UTC)
    ids = [new_request_id() for _ in range(20_000)]  # spans several refills of the random pool
    after = datetime.now(UTC)
    assert len(set(ids)) == len(ids)
    parsed = [uuid.UUID(request_id) for request_id in ids]
    assert all(str(u) == i and u.version == 7 and u.variant == uuid.RFC_4122 for u, i in zip(parsed, ids, strict=True))
    stamps = [u.int >> 80 for u in parsed]
    assert stamps == sorted(stamps)
    assert before.timestamp() * 1000 - 1 <= stamps[0]
    assert stamps[-1] <= after.timestamp() * 1000
    assert {i[19] for i in ids} == set("89ab")  # the variant digit keeps two random bits
    assert len({u.int & ((1 << 62) - 1) for u in parsed}) == len(ids)

    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.write(writer, "\n".join(new_request_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    with os.fdopen(reader) as pipe:
        child_ids = pipe.read().split("\n")
    parent_ids = [new_request_id() for _ in range(50)]
    tails = {i[15:] for i in parent_ids}
    assert len(child_ids) == 50
    assert not tails & {i[15:] for i in child_ids}
