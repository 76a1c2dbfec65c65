"""Connections a client holds without finishing a request are bounded: header-read, body-read and idle
keep-alive timeouts, a cap on connections (the oldest idle one makes room), the open-files limit raised
at start; and a malformed request is one short log line that quotes nothing the client sent. All through
real sockets; the file-limit case runs `chatledger serve` under a low ulimit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.relay.server_compat import (
    HANDLER_ATTRIBUTES,
    SERVER_ATTRIBUTES,
    GuardedRequestHandler,
    GuardedServer,
)

from .conftest import Ledger, make_config, start_ledger
from .payloads import OPENAI_BASIC
from .test_reliability import free_port, write_config
from .upstream import FakeUpstream

KEY = "sk-proj-MALFORMED-0123456789abcdef"
CHAT_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


async def guarded(upstream: FakeUpstream, database_url: str, tmp_path: Path, **server: object) -> Ledger:
    limits = {"header_timeout": 0.5, "body_timeout": 0.5, "keepalive_timeout": 5.0, **server}
    return await start_ledger(make_config(upstream.url, database_url, tmp_path, server=limits))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    began = time.monotonic()
    data = await asyncio.wait_for(reader.read(), seconds)
    return data, time.monotonic() - began


def test_the_aiohttp_internals_the_guard_relies_on_exist() -> None:
    for name in HANDLER_ATTRIBUTES:
        assert name in dir(RequestHandler), name
    server = web.Server(lambda request: web.Response(), loop=asyncio.new_event_loop())
    for name in SERVER_ATTRIBUTES:
        assert hasattr(server, name), name
    assert issubclass(GuardedServer, web.Server)
    assert issubclass(GuardedRequestHandler, RequestHandler)
    server._loop.close()


async def test_the_proxy_serves_through_the_guarded_server(ledger: Ledger) -> None:
    server = ledger.runner.server
    assert type(server) is GuardedServer
    assert server.limits.max_connections >= 16


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        pytest.param(b"", b"", id="nothing-sent"),
        pytest.param(b"GET /v1/mod", b"HTTP/1.1 408 ", id="half-sent-request-line"),
        pytest.param(CHAT_HEAD + b"Authorization: Bearer sk-", b"HTTP/1.1 408 ", id="headers-never-finished"),
    ],
)
async def test_headers_must_arrive_within_the_header_timeout(
    upstream: FakeUpstream, tmp_path: Path, sent: bytes, answer: bytes
) -> None:
    ledger = await guarded(upstream, f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", tmp_path)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", ledger.port)
        writer.write(sent)
        try:
            data, took = await closed_within(reader, 5)
        finally:
            writer.close()
        assert data.startswith(answer)
        assert 0.4 < took < 2.0
    finally:
        await ledger.stop()
    assert upstream.requests == []


async def test_headers_trickling_in_byte_by_byte_are_cut_off(upstream: FakeUpstream, tmp_path: Path) -> None:
    ledger = await guarded(upstream, f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", tmp_path)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", ledger.port)
        began = time.monotonic()
        try:
            for byte in CHAT_HEAD + b"X-Slow: " + b"a" * 100:  # slowloris: a byte every 50 ms, 9 s in all
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
                if reader.at_eof():
                    break
            await asyncio.wait_for(reader.read(), 3)
        except ConnectionError:  # a byte sent after the server closed
            pass
        finally:
            writer.close()
        assert time.monotonic() - began < 2.0
    finally:
        await ledger.stop()


async def test_a_slow_body_gets_408_and_a_row(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> None:
    ledger = await guarded(upstream, database_url, tmp_path)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", ledger.port)
        writer.write(CHAT_HEAD + f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n".encode() + b'{"mo')
        data, took = await closed_within(reader, 5)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert orjson.loads(body)["error"]["code"] == "request_timeout"
        assert 0.4 < took < 2.0
        row = await ledger.row()
    finally:
        await ledger.stop()
    assert (row["status_code"], row["outcome"]) == (408, "rejected")
    assert "server.body_timeout" in row["error"]
    assert upstream.requests == []


async def test_idle_keep_alive_connections_are_closed_and_a_next_request_is_timed_again(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    ledger = await guarded(upstream, f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", tmp_path, keepalive_timeout=1.0)
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", ledger.port)
        writer.write(request)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        _, took = await closed_within(reader, 5)  # idle after its response
        assert 0.9 < took < 2.5
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", ledger.port)
        writer.write(request)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"GET /v1/mo")  # the next request's headers never finish
        data, took = await closed_within(reader, 5)
        assert b"HTTP/1.1 408 " in data
        assert took < 1.5
        writer.close()
    finally:
        await ledger.stop()


async def test_at_the_connection_cap_the_oldest_idle_connection_makes_room(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    ledger = await guarded(
        upstream, f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", tmp_path, header_timeout=60.0, max_connections=20
    )
    try:
        idle = [await asyncio.open_connection("127.0.0.1", ledger.port) for _ in range(40)]
        for _, writer in idle:
            writer.write(b"GET /v1/mo")
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", ledger.port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, took = await closed_within(reader, 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 200 ")
        assert took < 1.0
        still_open = [r for r, _ in idle if not r.at_eof()]
        assert len(still_open) < 20
        for _, writer in idle:
            writer.close()
    finally:
        await ledger.stop()


@pytest.mark.slow
async def test_many_connections_under_a_low_file_limit_do_not_lock_clients_out(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """`chatledger serve` started with a soft limit of 256 open files (hard 512): it raises the soft limit,
    caps its connections to fit, and 600 sockets that never finish a request leave a client served."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("the test process itself needs 2,048 open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    port = free_port()
    config = write_config(tmp_path, upstream.url, database_url, port)
    config.write_text(config.read_text().replace("[server]\n", "[server]\nheader_timeout = 120\n"))

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))

    log = open(tmp_path / "serve.log", "ab")  # noqa: SIM115, ASYNC230 - handed to the child
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config),
        stdout=log, stderr=log, preexec_fn=low_limit,
    )  # fmt: skip
    log.close()
    sockets: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:

        async def get(path: str) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            try:
                return await asyncio.wait_for(reader.read(), 3)
            finally:
                writer.close()

        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                if (await get("/_ledger/health")).startswith(b"HTTP/1.1 200"):
                    break
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            await asyncio.sleep(0.1)
        limits = Path(f"/proc/{process.pid}/limits").read_text()  # noqa: ASYNC240
        (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
        assert line.split()[3:5] == ["512", "512"]  # soft raised to hard

        for _ in range(600):
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/chat/comp")
                sockets.append((reader, writer))
        await asyncio.sleep(0.5)
        began = time.monotonic()
        answer = await get("/v1/models")
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        assert time.monotonic() - began < 2.0
    finally:
        for _, writer in sockets:
            writer.close()
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


MALFORMED = [
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\x01\r\n\r\n",
                 id="control-character-in-authorization"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: " + KEY.encode() + b"\rjunk\r\n\r\n",
                 id="cr-in-x-api-key"),
    pytest.param(b"GET /v1/models?key=" + KEY.encode() + b"\xff\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
                 id="invalid-bytes-in-query-key"),
]  # fmt: skip


async def test_malformed_requests_log_one_short_line_without_the_key(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.relay import server_compat

    server_compat._refused._window = -1e9  # a fresh minute: earlier tests may have used this one's lines
    caplog.set_level(logging.DEBUG)
    for param in MALFORMED:
        (request,) = param.values
        reader, writer = await asyncio.open_connection("127.0.0.1", ledger.port)
        writer.write(request)
        data, _ = await closed_within(reader, 5)
        assert data.startswith(b"HTTP/1.")
        assert b" 400 " in data.split(b"\r\n")[0]
        writer.close()
    await asyncio.sleep(0.1)
    for record in caplog.records:
        text = record.getMessage() + (caplog.text if record.exc_info else "")
        assert KEY not in text, text
        assert record.exc_info is None or record.levelno < logging.INFO
    refused = [r.getMessage() for r in caplog.records if r.name == "chatledger.connections"]
    assert len(refused) == 3
    assert all(line.startswith("refused a malformed request from 127.0.0.1: ") for line in refused)
    assert KEY not in caplog.text


async def test_refused_request_lines_are_rate_limited(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    from proxy.relay import server_compat

    server_compat._refused._window = -1e9  # a fresh minute for this test
    caplog.set_level(logging.INFO, "chatledger.connections")
    for _ in range(30):
        reader, writer = await asyncio.open_connection("127.0.0.1", ledger.port)
        writer.write(MALFORMED[0].values[0])
        await closed_within(reader, 5)
        writer.close()
    assert len([r for r in caplog.records if r.name == "chatledger.connections"]) == 10


def test_the_process_raises_its_open_files_limit_to_the_hard_limit() -> None:
    code = (
        "import resource; from proxy.runtime import raise_file_limit; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 400)); print(raise_file_limit(), "
        "resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["400", "400"]


async def test_an_upstream_slower_than_the_header_timeout_does_not_cut_the_call(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    """Once a request's headers are in, the header timer stays off until the next request starts: aiohttp
    re-feeds an empty chunk after taking the request, which must not look like the start of another."""

    async def slow(request: web.Request, _body: bytes) -> web.StreamResponse:
        await asyncio.sleep(1.2)  # past header_timeout (0.5 s)
        return web.json_response(OPENAI_BASIC)

    upstream.add("slow", slow)
    ledger = await guarded(upstream, database_url, tmp_path, body_timeout=5.0)
    try:
        body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        reader, writer = await asyncio.open_connection("127.0.0.1", ledger.port)
        for _ in range(2):  # and again on the same keep-alive connection
            writer.write(
                CHAT_HEAD + b"X-Fake-Scenario: slow\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 "), head
            length_line = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            length = int(length_line.split(b":")[1])
            assert orjson.loads(await reader.readexactly(length))["id"] == OPENAI_BASIC["id"]
        writer.close()
        rows = await ledger.rows(count=2)
    finally:
        await ledger.stop()
    assert [(row["status_code"], row["outcome"]) for row in rows] == [(200, "ok")] * 2
