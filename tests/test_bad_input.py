"""Bad input from either side never crashes a handler.

Requests (the documented rules):
- The proxy does not validate request bodies: invalid JSON, JSON that is not an object, any content
  type, non-UTF-8 bytes and empty bodies are forwarded byte for byte and the upstream answers them.
  On the chat path each gets a row (requested_model NULL when the body could not be read).
- A body over server.max_body_size is refused with 413 and an OpenAI-style JSON error, whether it
  announces its length or is chunked; the upstream is not called; on the chat path a row records it.
- Header blocks beyond aiohttp's parser limits (a line over 8190 bytes, too many headers, bytes not
  allowed in a request line) get aiohttp's 400 before any handler runs: no row, no upstream call.
- Header values that are not UTF-8 are forwarded with the undecodable bytes left out (aiohttp's
  client cannot send them); what the ledger stores from them (X-Ledger-User, X-Ledger-Tags) has
  them replaced by U+FFFD.

Responses: whatever the upstream sends reaches the client unchanged; the parser takes what has the
right type, leaves the rest NULL, and marks the row `unparsed` when nothing could be read.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.parse.chat_json import parse_completion_body
from proxy.parse.record import CompletionRecord

from .conftest import Ledger, make_config, start_ledger
from .helpers import raw_request
from .payloads import OPENAI_BASIC
from .upstream import FakeUpstream, json_reply, sse_reply

CHAT_PATH = "/v1/chat/completions"
KEY = "sk-bad-input-key-000111222333"


def http_status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def handler_crashes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records of a handler that raised (aiohttp logs these as 'Error handling request')."""
    from aiohttp.http_exceptions import HttpProcessingError

    crashes = []
    for record in caplog.records:
        if record.levelno >= logging.ERROR and record.name.startswith(("aiohttp", "proxy")):
            exc = record.exc_info[1] if record.exc_info else None
            if not isinstance(exc, HttpProcessingError):  # the parser's 400s are not crashes
                crashes.append(record.getMessage())
    return crashes


# ---- requests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "model"),
    [
        pytest.param(b'{"model": "gpt-4o", "messages": [', "application/json", None, id="invalid-json"),
        pytest.param(b"[1, 2, 3]", "application/json", None, id="json-array"),
        pytest.param(b'"just a string"', "application/json", None, id="json-string"),
        pytest.param(b"null", "application/json", None, id="json-null"),
        pytest.param(b"", "application/json", None, id="empty"),
        pytest.param(
            b'{"model": "gpt-4o"}', "text/plain", "gpt-4o", id="text-plain"
        ),  # content type not checked
        pytest.param(b"model=gpt-4o&stream=true", "application/x-www-form-urlencoded", None, id="form"),
        pytest.param(
            b'{"model": "caf\xe9\xff", "stream": true}', "application/json", None, id="non-utf8-body"
        ),
        pytest.param(
            b'{"stream": true, "model": "x"', "application/json", None, id="truncated-stream-request"
        ),
        pytest.param(b"\x00\x01\x02\xff" * 64, "application/octet-stream", None, id="binary"),
    ],
)
async def test_unreadable_bodies_are_forwarded_byte_exact_and_logged(
    ledger: Ledger,
    upstream: FakeUpstream,
    body: bytes,
    content_type: str,
    model: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            ledger.url + CHAT_PATH,
            data=body,
            headers={"Content-Type": content_type, "Authorization": f"Bearer {KEY}"},
        ) as response,
    ):
        assert response.status == 200
        assert (await response.json())["id"] == OPENAI_BASIC["id"]
    (received,) = upstream.requests
    assert received.body == body
    assert received.headers["content-type"] == content_type
    row = await ledger.row()
    assert row["path"] == CHAT_PATH
    assert row["requested_model"] == model
    assert row["stream"] is False
    assert row["outcome"] == "ok"
    assert row["completion_id"] == OPENAI_BASIC["id"]
    assert handler_crashes(caplog) == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_413_json_and_never_forwarded(
    upstream: FakeUpstream, database_url: str, tmp_path: Any, chunked: bool
) -> None:
    config = make_config(upstream.url, database_url, tmp_path, server={"max_body_size": 1024})
    ledger = await start_ledger(config)
    try:
        body = b'{"model": "gpt-4o", "pad": "' + b"x" * 4096 + b'"}'

        async def chunks() -> Any:
            for start in range(0, len(body), 500):
                yield body[start : start + 500]

        async with (
            aiohttp.ClientSession() as session,
            session.post(
                ledger.url + CHAT_PATH,
                data=chunks() if chunked else body,
                headers={"Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 413
            assert response.content_type == "application/json"
            error = (await response.json())["error"]
            request_id = response.headers["X-Ledger-Request-Id"]
        assert error["code"] == "request_too_large"
        assert "1024 bytes" in error["message"]
        assert upstream.requests == []
        row = await ledger.row()
        assert row["request_id"] == request_id
        assert row["status_code"] == 413
        assert row["error"] == error["message"]
        # and the proxy carries on
        async with aiohttp.ClientSession() as session, session.post(ledger.url + CHAT_PATH, data=b"{}") as ok:
            assert ok.status == 200
    finally:
        await ledger.stop()


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
            id="header-line-20kB",
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
            + b"\r\n",
            id="1000-headers",
        ),
        pytest.param(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="request-line-20kB"),
        pytest.param(b"GET /v1/mod\xffels HTTP/1.1\r\nHost: x\r\n\r\n", id="non-utf8-target"),
        pytest.param(b"\x00\x01\x02 garbage\r\n\r\n", id="not-http"),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 5\r\nContent-Length: 9\r\n\r\n{}",
            id="conflicting-content-length",
        ),
    ],
)
async def test_absurd_request_heads_get_400_before_any_handler(
    ledger: Ledger, upstream: FakeUpstream, request_bytes: bytes
) -> None:
    response = await raw_request(ledger.port, request_bytes)
    assert http_status(response) in (400, 431)
    assert upstream.requests == []
    assert await ledger.rows() == []
    async with aiohttp.ClientSession() as session, session.get(ledger.url + "/_ledger/health") as health:
        assert health.status == 200


async def test_non_utf8_headers_are_forwarded_and_stored_sanitized(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    body = b'{"model": "gpt-4o", "user": "u\\u0000x"}'
    response = await raw_request(
        ledger.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer sk-\xff\xfe-key\r\n"
        b"X-Custom: caf\xe9\r\n"
        b"X-Ledger-Tags: team=caf\xe9,env=prod\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body,
    )
    assert http_status(response) == 200
    (received,) = upstream.requests
    assert received.headers["x-custom"] == "caf"
    row = await ledger.row()
    assert row["requested_model"] == "gpt-4o"
    assert row["user"] == "ux"  # NUL removed: PostgreSQL refuses it in text
    assert row["tags"] == {"team": "caf\ufffd", "env": "prod"}
    assert len(row["api_key_hash"] or "") == 16


# ---- responses ----------------------------------------------------------------------------------


def completion(**changes: Any) -> dict[str, Any]:
    body = orjson.loads(orjson.dumps(OPENAI_BASIC))
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".", 1)
            body[outer][inner] = value
        else:
            body[key] = value
    return body


NO_USAGE = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None, "cached_tokens": None}
# (changed fields, column -> expected value in the row); other columns keep OPENAI_BASIC's values
WRONG_TYPES = [
    ({"id": 12345}, {"completion_id": None}),
    ({"id": {"nested": ["garbage"]}}, {"completion_id": None}),
    ({"model": ["gpt", 4]}, {"model": None}),
    ({"created": "yesterday"}, {"created": None}),
    ({"created": -5}, {"created": None}),
    ({"usage.prompt_tokens": "1117"}, {"prompt_tokens": None}),
    ({"usage.prompt_tokens": -1}, {"prompt_tokens": None}),
    ({"usage.prompt_tokens": 1.5}, {"prompt_tokens": None}),
    ({"usage.completion_tokens": True}, {"completion_tokens": None}),
    ({"usage.total_tokens": None}, {"total_tokens": 1117 + 46}),  # derived from the two parts
    ({"usage.prompt_tokens_details": "lots"}, {"cached_tokens": None}),
    ({"usage.prompt_tokens_details": {"cached_tokens": {"a": 1}}}, {"cached_tokens": None}),
    ({"usage": "not an object"}, NO_USAGE),
    ({"usage": [1, 2]}, NO_USAGE),
    ({"choices": None}, {"choice_count": 0}),
    ({"choices": "stop"}, {"choice_count": 0}),
    ({"choices": [None, 7, "x", {"index": "zero", "finish_reason": 5}]}, {"choice_count": 0}),
    ({"choices": [{"index": 0, "finish_reason": ["stop"], "message": "hi"}]}, {"choice_count": 1}),
    (
        {"system_fingerprint": 3.14, "service_tier": {"tier": 1}},
        {"system_fingerprint": None, "service_tier": None},
    ),
    ({"model": "x\u0000y"}, {"model": "xy"}),
]


@pytest.mark.parametrize(("changes", "expected"), WRONG_TYPES, ids=[str(c) for c, _ in WRONG_TYPES])
async def test_wrong_types_in_a_completion_become_null(
    ledger: Ledger, upstream: FakeUpstream, changes: dict[str, Any], expected: dict[str, Any]
) -> None:
    body = completion(**changes)
    upstream.add("wrong", json_reply(body))
    async with (
        aiohttp.ClientSession() as session,
        session.post(ledger.url + CHAT_PATH, data=b"{}", headers={"X-Fake-Scenario": "wrong"}) as response,
    ):
        assert response.status == 200
        assert await response.read() == orjson.dumps(body)  # passed through unchanged
    row = await ledger.row()
    row["choice_count"] = len(row["choices"])
    baseline = {
        "completion_id": OPENAI_BASIC["id"],
        "model": OPENAI_BASIC["model"],
        "created": OPENAI_BASIC["created"],
        "prompt_tokens": 1117,
        "completion_tokens": 46,
        "total_tokens": 1163,
        "cached_tokens": 1024,
        "system_fingerprint": OPENAI_BASIC["system_fingerprint"],
        "service_tier": OPENAI_BASIC["service_tier"],
        "choice_count": 1,
    }
    for column, value in {**baseline, **expected}.items():
        assert row[column] == value, (column, row[column])
    assert row["outcome"] == "ok"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"<html>502 Bad Gateway</html>", id="html"),
        pytest.param(b'{"id": "chatcmpl-1", "choices": [', id="truncated-json"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="nested-5000-deep"),
        pytest.param(b"\xff\xfe\x00garbage", id="binary"),
        pytest.param(b"", id="empty"),
        pytest.param(b"[]", id="json-array"),
    ],
)
async def test_non_json_body_with_json_content_type_is_unparsed(
    ledger: Ledger, upstream: FakeUpstream, raw: bytes
) -> None:
    upstream.add("junk", json_reply(None, raw=raw))
    async with (
        aiohttp.ClientSession() as session,
        session.post(ledger.url + CHAT_PATH, data=b"{}", headers={"X-Fake-Scenario": "junk"}) as response,
    ):
        assert response.status == 200
        assert await response.read() == raw
    row = await ledger.row()
    assert row["outcome"] == "unparsed"
    assert row["status_code"] == 200
    assert row["error"]
    assert row["completion_id"] is None
    assert row["prompt_tokens"] is None


async def test_sse_stream_of_random_bytes(ledger: Ledger, upstream: FakeUpstream) -> None:
    rng = random.Random(5)
    noise = bytes(rng.getrandbits(8) for _ in range(64 * 1024))
    upstream.add("noise", sse_reply(noise, sizes=[1000, 1, 333]))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            ledger.url + CHAT_PATH, data=b'{"stream": true}', headers={"X-Fake-Scenario": "noise"}
        ) as response,
    ):
        assert response.status == 200
        assert await response.read() == noise
    row = await ledger.row()
    assert row["stream"] is True
    assert row["outcome"] == "unparsed"
    assert row["prompt_tokens"] is None


async def test_sse_events_that_are_not_json(ledger: Ledger, upstream: FakeUpstream) -> None:
    stream = b"data: {not json}\n\ndata: [1,2]\n\nevent: x\ndata: \xff\xfe\n\ndata: [DONE]\n\n"
    upstream.add("badsse", sse_reply(stream))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            ledger.url + CHAT_PATH, data=b'{"stream": true}', headers={"X-Fake-Scenario": "badsse"}
        ) as response,
    ):
        assert await response.read() == stream
    row = await ledger.row()
    assert row["outcome"] == "unparsed"


def test_parser_on_hostile_documents_never_raises() -> None:
    hostile: list[bytes] = [
        b'{"choices": [{"index": 1000000000000000000000000000000}], "usage": {"total_tokens": 1e30}}',
        orjson.dumps({"choices": [{"index": -1}] * 1000}),
        orjson.dumps({"usage": {"cost": "NaN"}}),
        orjson.dumps({"usage": {"cost": "1e999999"}}),
        orjson.dumps({"usage": {"cost": -3}}),
        orjson.dumps({"error": {"message": {"nested": True}}}),
        orjson.dumps({"error": 12}),
        orjson.dumps({"response": {"output": None, "usage": "x"}}),
        orjson.dumps({"x_groq": {"usage": {"prompt_tokens": "9"}}}),
        b'{"a":' * 2000,
    ]
    for body in hostile:
        record = CompletionRecord("r", None, "POST", CHAT_PATH, "u")  # type: ignore[arg-type]
        parse_completion_body(record, body)
        assert record.cost is None or record.cost >= 0
        assert all(c.index >= 0 for c in record.choices)
