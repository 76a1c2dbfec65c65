"""Security: not an open proxy, the bearer key never reaches disk, request and response bodies are
not stored, the admin token is checked in constant time and failures look the same whether a
token is configured or not, and binding beyond loopback without a token warns."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from sqlalchemy import select

from proxy.config import Config
from proxy.credentials import key_fingerprint
from proxy.store.models import completions_table

from .conftest import Ledger, make_config, start_ledger
from .helpers import raw_request
from .payloads import OPENAI_BASIC, openai_stream
from .test_reliability import HeldLock, free_port, serve, write_config
from .upstream import FakeUpstream, json_reply, sse_reply

SECRET_KEY = "sk-proj-SECRETKEY-do-not-store-4f9a1c2e7b"


# ---- not an open proxy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n", id="absolute-form"),
        pytest.param(
            b"POST http://evil.example/v1/chat/completions HTTP/1.1\r\nHost: evil.example\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            id="absolute-form-chat",
        ),
        pytest.param(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", id="connect"),
        pytest.param(b"CONNECT /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", id="connect-origin-form"),
        pytest.param(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", id="asterisk-form"),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: evil.example\r\n\r\n", id="xfh"
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nForwarded: for=1.2.3.4;host=evil.example\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            id="forwarded-host",
        ),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Original-URL: http://evil/\r\n\r\n", id="x-original-url"
        ),
    ],
)
async def test_not_an_open_proxy(ledger: Ledger, upstream: FakeUpstream, request_bytes: bytes) -> None:
    response = await raw_request(
        ledger.port, request_bytes.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    )
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    error = orjson.loads(body)["error"]
    assert error["code"] == "proxy_refused"
    assert upstream.requests == []
    assert await ledger.rows() == []


@pytest.mark.parametrize(
    "target",
    ["//evil.example/x", "/@evil.example/x", "/%2F%2Fevil.example/x", "/..%2F..%2Fevil", "/\\\\evil.example"],
)
async def test_path_tricks_still_reach_only_the_configured_upstream(
    ledger: Ledger, upstream: FakeUpstream, target: str
) -> None:
    response = await raw_request(
        ledger.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert response.startswith(b"HTTP/1.1 200 ")
    (received,) = upstream.requests  # the fake upstream is the only server that could answer
    assert received.path_qs == target


# ---- the bearer key never reaches disk ----------------------------------------------------------------


def files_under(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file()]


async def test_bearer_key_never_reaches_disk(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Traffic of every kind, a database outage (spool), a shutdown while the database is locked;
    then every file the proxy wrote is searched for the key, the prompt and the answer."""
    prompt, answer = "SECRET-PROMPT-7731", "SECRET-ANSWER-1942"
    body = orjson.loads(orjson.dumps(OPENAI_BASIC))
    body["choices"][0]["message"]["content"] = answer
    upstream.add("ok", json_reply(body))
    upstream.add("stream", sse_reply(openai_stream(True).replace(b"Hello", answer.encode())))
    echo = {"error": {"message": f"Incorrect API key provided: {SECRET_KEY}", "code": "invalid_api_key"}}
    upstream.add("echo401", json_reply(echo, status=401))
    upstream.add("echo500", json_reply(None, status=500, raw=f"upstream says key={SECRET_KEY}".encode()))
    upstream.add(
        "sse_error", sse_reply(f'data: {{"error": {{"message": "bad key {SECRET_KEY}"}}}}\n\n'.encode())
    )

    async def reset(request: web.Request, _body: bytes) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    upstream.add("reset", reset)
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    port = free_port()
    config = write_config(tmp_path, upstream.url, database_url, port, write_timeout=0.5)
    config.write_text(config.read_text().replace('level = "info"', 'level = "debug"'))
    served = await serve(config, tmp_path / "serve.log", port)
    chat = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]})

    async def traffic(session: aiohttp.ClientSession) -> list[int]:
        statuses = []
        for scenario in ("ok", "stream", "echo401", "echo500", "sse_error", "reset"):
            for header in (
                {"Authorization": f"Bearer {SECRET_KEY}"},
                {"api-key": SECRET_KEY},
                {"x-api-key": SECRET_KEY},
            ):
                with_body = chat if scenario != "stream" else chat[:-1] + b',"stream":true}'
                try:
                    async with session.post(
                        served.url + "/v1/chat/completions",
                        data=with_body,
                        headers={**header, "X-Fake-Scenario": scenario, "Content-Type": "application/json"},
                    ) as response:
                        text = await response.text()
                        assert (
                            SECRET_KEY not in text or scenario.startswith("echo") or scenario == "sse_error"
                        )
                        statuses.append(response.status)
                except aiohttp.ClientError:
                    statuses.append(0)
        return statuses

    try:
        async with aiohttp.ClientSession() as session:
            statuses = await traffic(session)
            assert {200, 401, 500, 502} <= set(statuses), statuses
            async with HeldLock(tmp_path / "ledger.db"):  # the database refuses writes: the spool takes over
                await traffic(session)
                await asyncio.sleep(1.0)
                served.process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(served.process.wait(), 20) == 0
    finally:
        if served.process.returncode is None:
            served.process.kill()
            await served.process.wait()
    spooled = list((tmp_path / "spool").glob("spool-*.jsonl"))
    assert spooled, "the outage should have left records in the spool"
    fingerprint = key_fingerprint(SECRET_KEY).encode()
    assert any(fingerprint in path.read_bytes() for path in spooled)  # the rows are there, keyed by hash
    written = files_under(tmp_path)
    assert {p.name for p in written} >= {"ledger.db", "serve.log"}
    for path in written:
        if path.name == "chatledger.toml":
            continue
        data = path.read_bytes()
        for secret in (SECRET_KEY, prompt, answer):
            assert secret.encode() not in data, f"{secret} found in {path}"


async def test_error_messages_returned_to_the_client_redact_the_key(tmp_path: Path) -> None:
    # the key is also a valid hostname label: a DNS error naming the URL must not echo a key in it
    config = make_config("http://nonexistent.invalid", f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", tmp_path)
    ledger = await start_ledger(config)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                ledger.url + "/v1/chat/completions",
                data=b"{}",
                headers={"Authorization": f"Bearer {SECRET_KEY}"},
            ) as response,
        ):
            assert response.status == 502
            assert SECRET_KEY not in await response.text()
        row = await ledger.row()
        assert SECRET_KEY not in orjson.dumps(row, default=str).decode()
        assert row["api_key_hash"] == key_fingerprint(SECRET_KEY)
    finally:
        await ledger.stop()


# ---- admin API ----------------------------------------------------------------------------------------


async def admin_answers(config: Config, token: str | None) -> list[tuple[int, bytes, dict[str, str]]]:
    ledger = await start_ledger(config)
    answers = []
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/_ledger/api/completions", "/_ledger/api/stats", "/_ledger/metrics"):
                headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
                async with session.get(ledger.url + path, headers=headers) as response:
                    kept = {k: v for k, v in response.headers.items() if k not in ("Date", "Content-Length")}
                    answers.append((response.status, await response.read(), kept))
    finally:
        await ledger.stop()
    return answers


async def test_admin_failures_do_not_reveal_whether_a_token_is_configured(
    upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("proxy.web.auth.hmac.compare_digest", spy)
    base = make_config(upstream.url, f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", tmp_path)
    exposed = base.replace("server", host="0.0.0.0")  # not loopback: the API is not open by default
    with_token = exposed.replace("admin", token="the-right-admin-token")

    wrong_with = await admin_answers(with_token, "a-wrong-token")
    wrong_without = await admin_answers(exposed, "a-wrong-token")
    assert [status for status, _, _ in wrong_with] == [403, 403, 403]
    assert wrong_with == wrong_without  # same status, body and headers
    assert compared, "tokens must be compared with hmac.compare_digest"
    assert all(a == b"a-wrong-token" for a, _ in compared)

    right = await admin_answers(with_token, "the-right-admin-token")
    assert [status for status, _, _ in right] == [200, 200, 200]
    # the token configured elsewhere is no key to this server
    assert [status for status, _, _ in await admin_answers(exposed, "the-right-admin-token")] == [
        403,
        403,
        403,
    ]


# ---- binding beyond loopback --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "token", "warns"),
    [("0.0.0.0", "", True), ("::", "", True), ("0.0.0.0", "t0ken", False), ("127.0.0.1", "", False)],
)
def test_binding_beyond_loopback_without_a_token_warns(
    host: str, token: str, warns: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy import server
    from proxy.config import load

    ran: list[Any] = []
    monkeypatch.setattr(server, "run_worker", lambda config, sockets: ran.append(config) or 0)
    overrides = {("server", "host"): host, ("server", "port"): 0, ("admin", "token"): token or None}
    config = load(None, overrides, environ={})
    config = config.replace("database", auto_migrate=False)
    caplog.set_level(logging.WARNING, "chatledger")
    assert server.serve(config) == 0
    assert len(ran) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"listening on {host} without [admin] token" in w for w in warnings) is warns, warnings


async def test_a_key_in_the_query_string_is_redacted_in_the_logged_path(ledger: Ledger, upstream: FakeUpstream) -> None:
    """Some OpenAI-compatible endpoints take the key as `?key=`: the upstream gets it, the ledger never."""
    secret = "sk-query-" + "q" * 24
    async with aiohttp.ClientSession() as session:
        url = f"{ledger.url}/v1/chat/completions?key={secret}&alt=sse"
        async with session.post(url, json={"model": "gpt-4o", "messages": []}) as response:
            assert response.status == 200
            await response.read()
    assert upstream.requests[-1].path_qs == f"/v1/chat/completions?key={secret}&alt=sse"
    row = await ledger.row()
    assert row["path"] == "/v1/chat/completions?key=[redacted]&alt=sse"
    async with ledger.engine.connect() as conn:
        dump = [str(tuple(r)) for r in await conn.execute(select(completions_table))]
    assert not any(secret in line for line in dump)
