"""Every credential a request carries (all auth headers, credential-like query parameters, cookies) is
scrubbed from the logged `error` and `path` before the error is cut to its stored length, on every path
(JSON errors, plain-text errors, error events inside a 200 stream), and the writer only ever gets
fingerprints. An upstream that echoes what it was sent is the attacker here."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.credentials import fingerprints, key_fingerprint, redact_fingerprinted, request_secrets
from proxy.parse.capture import Capture
from proxy.parse.fields import MAX_ERROR_CHARS

from .conftest import Ledger
from .upstream import FakeUpstream

CHAT = "/v1/chat/completions"
BEARER = "sk-proj-BEARER-0123456789abcdefghij"
X_API_KEY = "sk-ant-XAPIKEY-abcdefghij0123456789"
AZURE_KEY = "azure0123456789abcdef0123456789ab"
QUERY_KEY = "AIzaQUERYKEY_0123456789-abcdefghij"
GOOG_KEY = "AIzaGOOGHEADER-0123456789abcdef"
COOKIE_SESSION = "sess-COOKIE-0123456789abcdef"
BASIC_PASSWORD = "hunter2-BASIC-password-0123"
ALL = (BEARER, X_API_KEY, AZURE_KEY, QUERY_KEY, GOOG_KEY, COOKIE_SESSION, BASIC_PASSWORD)


def everything_sent(request: web.Request) -> str:
    """What a careless upstream puts in an error message: every header value and the whole target."""
    return " ".join(f"{name}={value}" for name, value in request.headers.items()) + f" target={request.raw_path}"


def echo_json(status: int = 401, prefix: str = "") -> Any:
    async def scenario(request: web.Request, _body: bytes) -> web.StreamResponse:
        message = prefix + everything_sent(request)
        return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)

    return scenario


def echo_text(prefix: str = "") -> Any:
    async def scenario(request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(status=500, text=prefix + everything_sent(request))

    return scenario


def echo_stream() -> Any:
    async def scenario(request: web.Request, _body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        first = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]}  # fmt: skip
        await response.write(b"data: " + orjson.dumps(first) + b"\n\n")
        error = {"error": {"message": "mid-stream failure for " + everything_sent(request)}}
        await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
        await response.write_eof()
        return response

    return scenario


def credential_headers(scenario: str) -> dict[str, str]:
    basic = base64.b64encode(f"alice:{BASIC_PASSWORD}".encode()).decode()
    return {
        "Authorization": f"Bearer {BEARER}",
        "x-api-key": X_API_KEY,
        "api-key": AZURE_KEY,
        "x-goog-api-key": GOOG_KEY,
        "Proxy-Authorization": f"Basic {basic}",
        "Cookie": f"theme=dark; session={COOKIE_SESSION}",
        "X-Fake-Scenario": scenario,
    }


def assert_clean(text: str) -> None:
    for secret in ALL:
        assert secret not in text, f"{secret} leaked: {text}"
        assert quote(secret, safe="") not in text


async def call(ledger: Ledger, scenario: str, path: str = CHAT, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    async with (
        aiohttp.ClientSession() as session,
        session.post(ledger.url + path, json=body, headers=credential_headers(scenario)) as response,
    ):
        return await response.read()


@pytest.mark.parametrize("scenario", ["json401", "text500", "stream_error"])
async def test_every_credential_is_scrubbed_from_error_and_path(
    ledger: Ledger, upstream: FakeUpstream, scenario: str
) -> None:
    upstream.add("json401", echo_json())
    upstream.add("text500", echo_text())
    upstream.add("stream_error", echo_stream())
    path = f"{CHAT}?alt=sse&key={quote(QUERY_KEY)}&access_token={quote(BEARER)}&sig=abcdefgh12"
    answer = await call(ledger, scenario, path, stream=scenario == "stream_error")
    assert BEARER.encode() in answer
    assert QUERY_KEY.encode() in answer
    row = await ledger.row()
    assert row["error"], row
    assert "[redacted]" in row["error"]
    assert_clean(row["error"])
    assert row["path"] == f"{CHAT}?alt=sse&key=[redacted]&access_token=[redacted]&sig=[redacted]"
    assert row["api_key_hash"] == key_fingerprint(BEARER)
    async with (
        aiohttp.ClientSession() as session,
        session.get(ledger.url + "/_ledger/api/completions") as response,
    ):
        assert response.status == 200
        assert_clean(await response.text())


@pytest.mark.parametrize("scenario", ["json401", "text500"])
async def test_a_key_cut_by_the_length_limit_leaves_no_part_of_itself(
    ledger: Ledger, upstream: FakeUpstream, scenario: str
) -> None:
    """The error is scrubbed first, then cut: a key straddling the cut is not left half-stored."""
    for offset in (MAX_ERROR_CHARS - 12, 290):  # the stored limit, and where plain-text summaries were cut
        upstream.add(scenario, echo_json(prefix="x" * offset) if scenario == "json401" else echo_text("x" * offset))
        await call(ledger, scenario)
    rows = await ledger.rows(count=2)
    for row in rows:
        assert len(row["error"]) <= MAX_ERROR_CHARS
        for secret in ALL:
            for cut in range(8, len(secret) + 1, 4):
                assert secret[:cut] not in row["error"], (secret[:cut], row["error"])


async def test_a_key_in_the_path_itself_is_scrubbed(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("json401", echo_json())
    await call(ledger, "json401", f"/bot{BEARER}/v1/chat/completions")
    row = await ledger.row()
    assert row["path"] == "/bot[redacted]/v1/chat/completions"
    assert_clean(row["error"])


def test_the_request_path_hands_the_writer_fingerprints_only() -> None:
    basic = base64.b64encode(f"alice:{BASIC_PASSWORD}".encode()).decode()
    headers = CIMultiDict(
        {"Authorization": f"Basic {basic}", "x-api-key": X_API_KEY, "Cookie": f"a=1; session={COOKIE_SESSION}"}
    )
    secrets = request_secrets(headers, f"/v1/x?api-key={QUERY_KEY}&token=short&n=3")
    assert {X_API_KEY, BASIC_PASSWORD, COOKIE_SESSION, QUERY_KEY} <= set(secrets)
    assert "short" not in secrets
    assert "3" not in secrets
    prints = fingerprints(secrets)
    assert (key_fingerprint(X_API_KEY), len(X_API_KEY)) in prints
    assert not any(secret in repr(prints) for secret in ALL)
    assert "secrets" in Capture._fields
    assert "key_length" not in Capture._fields
    text = f"bad: {X_API_KEY}, {QUERY_KEY}; pw {BASIC_PASSWORD} cookie={COOKIE_SESSION}"
    assert redact_fingerprinted(text, prints) == "bad: [redacted], [redacted]; pw [redacted] cookie=[redacted]"
