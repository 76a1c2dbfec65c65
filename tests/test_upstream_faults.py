"""Upstream faults: each gives the client a defined answer and the row a defined outcome, and the
proxy stays healthy afterwards.

| fault                         | client gets                              | row outcome / error             |
|-------------------------------|------------------------------------------|---------------------------------|
| connection refused            | 502 `upstream_unreachable` JSON          | unreachable                     |
| DNS failure                   | 502 `upstream_unreachable` JSON          | unreachable                     |
| TLS certificate not trusted   | 502 `upstream_unreachable` JSON          | unreachable (certificate ...)   |
| hang before headers           | 504 `upstream_timeout` JSON              | timeout                         |
| hang mid-stream               | the bytes so far, then a cut connection  | timeout, fields seen so far     |
| reset mid-body / mid-stream   | the bytes so far, then a cut connection  | upstream_error                  |
| invalid HTTP                  | 502 `upstream_unreachable` JSON          | upstream_error                  |
| 100 MB body                   | all 100 MB, byte-exact                   | unparsed ("over 16 MiB")        |

The upstream does not depend on the database, so these run on SQLite only.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from .conftest import Ledger, make_config, start_ledger
from .payloads import OPENAI_BASIC, openai_stream
from .upstream import FakeUpstream, sse_reply

API_KEY = "sk-upstream-fault-key-9876543210"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
STREAM_CHAT = orjson.dumps(
    {"model": "gpt-4o", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
)


async def ledger_for(upstream_url: str, tmp_path: Path, **upstream: Any) -> Ledger:
    config = make_config(upstream_url, f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}", tmp_path)
    if upstream:
        config = config.replace("upstream", **upstream)
    return await start_ledger(config)


async def post(ledger: Ledger, body: bytes = CHAT, scenario: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = dict(HEADERS)
    if scenario:
        headers["X-Fake-Scenario"] = scenario
    async with (
        aiohttp.ClientSession() as session,
        session.post(ledger.url + "/v1/chat/completions", data=body, headers=headers) as response,
    ):
        return response.status, await response.json()


async def assert_healthy(ledger: Ledger) -> None:
    async with aiohttp.ClientSession() as session, session.get(ledger.url + "/_ledger/health") as response:
        assert response.status == 200
        health = await response.json()
    assert health["status"] == "ok", health
    assert health["rows_lost"] == 0


def assert_no_key(row: dict[str, Any], answer: Any = None) -> None:
    assert API_KEY not in orjson.dumps(row, default=str).decode()
    assert API_KEY not in orjson.dumps(answer).decode()


# ---- before any response: a JSON error from the proxy ---------------------------------------------


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed when the with-block ends: nothing listens


@pytest.mark.parametrize(
    ("target", "detail"),
    [
        pytest.param(lambda: f"http://127.0.0.1:{closed_port()}", "Connect call failed", id="refused"),
        pytest.param(lambda: "http://nonexistent.invalid", "nonexistent.invalid", id="dns"),
    ],
)
async def test_unreachable_upstream(target: Any, detail: str, tmp_path: Path) -> None:
    ledger = await ledger_for(target(), tmp_path, connect_timeout=3.0)
    try:
        status, answer = await post(ledger)
        assert status == 502
        assert answer["error"]["code"] == "upstream_unreachable"
        assert detail in answer["error"]["message"]
        row = await ledger.row()
        assert row["outcome"] == "unreachable"
        assert row["status_code"] is None
        assert detail in row["error"]
        assert row["requested_model"] == "gpt-4o"
        assert_no_key(row, answer)
        await assert_healthy(ledger)
    finally:
        await ledger.stop()


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_error_is_a_502_not_an_insecure_retry(
    self_signed: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    reached: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.json_response(OPENAI_BASIC)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    ledger = await ledger_for(f"https://127.0.0.1:{port}", tmp_path)
    try:
        status, answer = await post(ledger)
        assert status == 502
        assert answer["error"]["code"] == "upstream_unreachable"
        assert "certificate" in answer["error"]["message"].lower()
        assert reached == []  # no request was sent over the untrusted connection
        row = await ledger.row()
        assert row["outcome"] == "unreachable"
        assert "certificate" in row["error"].lower()
        assert_no_key(row, answer)
        await assert_healthy(ledger)
    finally:
        await ledger.stop()
        await runner.cleanup()


async def test_invalid_http_from_upstream(tmp_path: Path) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SPDY/9 banana\r\n\x00\x01\x02 not http at all\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ledger = await ledger_for(f"http://127.0.0.1:{port}", tmp_path)
    try:
        status, answer = await post(ledger)
        assert status == 502
        assert answer["error"]["code"] == "upstream_unreachable"
        assert "upstream failed before responding" in answer["error"]["message"]
        row = await ledger.row()
        assert row["outcome"] == "upstream_error"
        assert row["error"].startswith("upstream failed before responding")
        assert_no_key(row, answer)
        await assert_healthy(ledger)
    finally:
        await ledger.stop()
        server.close()
        await server.wait_closed()


async def hang_forever(request: web.Request, _body: bytes) -> web.StreamResponse:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


@pytest.fixture
async def faulty(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[tuple[FakeUpstream, Ledger]]:
    """The fake upstream with fault scenarios, behind a proxy with a short read timeout."""
    upstream.add("hang", hang_forever)
    ledger = await ledger_for(upstream.url, tmp_path, read_timeout=0.5)
    yield upstream, ledger
    await ledger.stop()


async def assert_recovers(upstream: FakeUpstream, ledger: Ledger, rows_before: int) -> None:
    """Healthy, and the next call goes through and is logged normally."""
    await assert_healthy(ledger)
    status, answer = await post(ledger)
    assert status == 200
    assert answer["id"] == OPENAI_BASIC["id"]
    rows = await ledger.rows()
    assert len(rows) == rows_before + 1
    assert rows[-1]["outcome"] == "ok"


async def test_hang_before_headers_is_a_504(faulty: tuple[FakeUpstream, Ledger]) -> None:
    upstream, ledger = faulty
    status, answer = await post(ledger, scenario="hang")
    assert status == 504
    assert answer["error"]["code"] == "upstream_timeout"
    row = await ledger.row()
    assert row["outcome"] == "timeout"
    assert row["status_code"] is None
    assert 400 <= row["duration_ms"] < 3000
    await assert_recovers(upstream, ledger, 1)


async def read_until_cut(ledger: Ledger, body: bytes, scenario: str) -> tuple[int, bytes, str]:
    """Status, the bytes received before the proxy cut the connection, and the error seen."""
    received = bytearray()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            ledger.url + "/v1/chat/completions", data=body, headers={**HEADERS, "X-Fake-Scenario": scenario}
        ) as response,
    ):
        try:
            async for chunk in response.content.iter_any():
                received += chunk
        except aiohttp.ClientPayloadError as exc:
            return response.status, bytes(received), type(exc).__name__
    return response.status, bytes(received), ""


async def test_hang_mid_stream_times_out_and_cuts_the_client(faulty: tuple[FakeUpstream, Ledger]) -> None:
    upstream, ledger = faulty
    stream = openai_stream(True)
    first_event_end = stream.index(b"\n\n") + 2
    upstream.add("hangmid", sse_reply(stream, sizes=[64], hang_after=first_event_end + 10))
    status, received, error = await read_until_cut(ledger, STREAM_CHAT, "hangmid")
    assert status == 200
    assert error == "ClientPayloadError"  # a truncated stream, never a clean end
    assert received == stream[: first_event_end + 10]
    row = await ledger.row()
    assert row["outcome"] == "timeout"
    assert row["stream"] is True
    assert row["model"] == orjson.loads(stream[len(b"data: ") : first_event_end - 2])["model"]
    assert row["prompt_tokens"] is None  # the usage chunk never came
    await assert_recovers(upstream, ledger, 1)


async def test_reset_mid_stream(faulty: tuple[FakeUpstream, Ledger]) -> None:
    upstream, ledger = faulty
    stream = openai_stream(True)
    upstream.add("cut", sse_reply(stream, sizes=[50], cut_after=300))
    status, received, error = await read_until_cut(ledger, STREAM_CHAT, "cut")
    assert status == 200
    assert error == "ClientPayloadError"
    assert received == stream[:300]
    row = await ledger.row()
    assert row["outcome"] == "upstream_error"
    assert "connection lost mid-response" in row["error"]
    await assert_recovers(upstream, ledger, 1)


async def test_reset_mid_body(faulty: tuple[FakeUpstream, Ledger]) -> None:
    upstream, ledger = faulty
    full = orjson.dumps(OPENAI_BASIC)

    async def reset(request: web.Request, _body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(full)
        await response.prepare(request)
        await response.write(full[:100])
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.add("reset", reset)
    status, received, error = await read_until_cut(ledger, CHAT, "reset")
    assert status == 200
    assert error == "ClientPayloadError"
    assert received == full[:100]
    row = await ledger.row()
    assert row["outcome"] == "upstream_error"
    assert "connection lost mid-response" in row["error"]
    assert row["completion_id"] is None  # nothing parsed from a truncated body
    await assert_recovers(upstream, ledger, 1)


# ---- a 100 MB response through a real `chatledger serve` process ----------------------------------

HUNDRED_MB = 100 * 1024 * 1024
PIECE = (b'{"pad":"' + b"x" * (1024 * 1024 - 10) + b'"}')[: 1024 * 1024]


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.mark.slow
async def test_100_mb_response_streams_through_with_bounded_memory(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    from .test_reliability import free_port, serve, write_config

    if not Path("/proc/self/status").exists():  # noqa: ASYNC240
        pytest.skip("needs /proc to read the proxy's peak memory")

    async def huge(request: web.Request, _body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = HUNDRED_MB
        await response.prepare(request)
        for _ in range(HUNDRED_MB // len(PIECE)):
            await response.write(PIECE)
        await response.write_eof()
        return response

    upstream.add("huge", huge)
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    port = free_port()
    served = await serve(
        write_config(tmp_path, upstream.url, database_url, port), tmp_path / "serve.log", port
    )
    try:
        pid = served.process.pid
        baseline = vm_kib(pid, "VmRSS")
        digest = hashlib.sha256()
        size = 0
        async with aiohttp.ClientSession() as session:
            async with session.post(
                served.url + "/v1/chat/completions", data=CHAT, headers={**HEADERS, "X-Fake-Scenario": "huge"}
            ) as response:
                assert response.status == 200
                request_id = response.headers["X-Ledger-Request-Id"]
                async for chunk in response.content.iter_chunked(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            async with session.get(served.url + "/_ledger/health") as health:
                assert (await health.json())["status"] == "ok"
        peak = vm_kib(pid, "VmHWM")
        expected = hashlib.sha256()
        for _ in range(HUNDRED_MB // len(PIECE)):
            expected.update(PIECE)
        assert size == HUNDRED_MB
        assert digest.hexdigest() == expected.hexdigest()
        growth_mib = (peak - baseline) / 1024
        print(f"100 MB response: proxy RSS {baseline / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB")
        assert growth_mib < 48, growth_mib  # the parse copy stops at 16 MiB; the rest only streams through
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.process.wait(), 20) == 0
    from .helpers import rows_by_request_id

    row = (await rows_by_request_id(database_url))[request_id]
    assert row["outcome"] == "unparsed"
    assert "over 16 MiB" in row["error"]
    assert row["status_code"] == 200
