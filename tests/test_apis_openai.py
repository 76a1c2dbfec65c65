"""The official openai client through the proxy on every OpenAI API that spends money besides chat:
Responses (JSON and streamed), embeddings, legacy completions (JSON and streamed), and OpenRouter's
BYOK cost. The client gets the upstream's bytes; each call is one row, checked field by field, on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import openai
import orjson
import pytest
from aiohttp import web

from .api_payloads import (
    BYOK_COMPLETION,
    EMBEDDING_VECTORS,
    EMBEDDINGS_USAGE,
    RESPONSE_CREATED,
    RESPONSE_ID,
    RESPONSE_TEXT,
    RESPONSES_BASIC,
    RESPONSES_ERROR_400,
    RESPONSES_ERROR_EVENT,
    RESPONSES_FAILED,
    RESPONSES_FAILED_STREAM,
    RESPONSES_INCOMPLETE,
    RESPONSES_STREAM,
    RESPONSES_TOOL_CALL,
    RESPONSES_USAGE,
    TEXT_COMPLETION,
    TEXT_PIECES,
    TEXT_STREAM_USAGE,
    embeddings_body,
    named_event,
    responses_stream,
    text_completion_stream,
)
from .conftest import Ledger
from .sdk_helpers import (
    KEY_HASH,
    PRICES,
    Tee,
    choices,
    echo_encoding,
    openai_client,
    priced_ledger,
    tokens,
    usd,
)
from .upstream import FakeUpstream, json_reply, sse_reply


@pytest.fixture
async def ledger(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    proxy = await priced_ledger(upstream.url, database_url, tmp_path)
    yield proxy
    await proxy.stop()


def responses_cost(usage: dict[str, int]) -> Decimal:
    rates = PRICES["o4-mini*"]
    cached = usage["input_tokens_details"]["cached_tokens"]
    return usd(
        (usage["input_tokens"] - cached, rates["prompt"]),
        (cached, rates["cache_read"]),
        (usage["output_tokens"], rates["completion"]),
    )


def responses_tokens(usage: dict[str, object]) -> dict[str, object]:
    return {
        "prompt_tokens": usage["input_tokens"],
        "completion_tokens": usage["output_tokens"],
        "total_tokens": usage["total_tokens"],
        "cached_tokens": usage["input_tokens_details"]["cached_tokens"],  # type: ignore[index]
        "cache_write_tokens": usage["input_tokens_details"]["cache_write_tokens"],  # type: ignore[index]
        "reasoning_tokens": usage["output_tokens_details"]["reasoning_tokens"],  # type: ignore[index]
    }


# ---- Responses API ------------------------------------------------------------------------------


async def test_responses_create(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("r", json_reply(RESPONSES_BASIC, headers={"x-request-id": "req_resp_1"}))
    tee = Tee()
    async with openai_client(ledger.url + "/v1", tee, "r", **{"X-Ledger-User": "u-7"}) as client:
        response = await client.responses.create(model="o4-mini", input="Why is the sky blue?")
    assert tee.body == orjson.dumps(RESPONSES_BASIC)
    assert response.id == RESPONSE_ID
    assert response.output_text == "".join(RESPONSE_TEXT)
    assert upstream.requests[0].path_qs == "/v1/responses"
    row = await ledger.row()
    assert {k: row[k] for k in ("api", "method", "path", "status_code", "outcome", "error", "stream")} == {
        "api": "responses",
        "method": "POST",
        "path": "/v1/responses",
        "status_code": 200,
        "outcome": "ok",
        "error": None,
        "stream": False,
    }
    assert (row["completion_id"], row["object"], row["created"]) == (RESPONSE_ID, "response", RESPONSE_CREATED)
    assert (row["requested_model"], row["model"]) == ("o4-mini", RESPONSES_BASIC["model"])
    assert (row["service_tier"], row["user"], row["api_key_hash"]) == ("default", "u-7", KEY_HASH)
    assert row["upstream_request_id"] == "req_resp_1"
    assert tokens(row) == responses_tokens(RESPONSES_USAGE)
    assert row["usage"] == RESPONSES_USAGE
    assert (row["cost"], row["cost_source"]) == (responses_cost(RESPONSES_USAGE), "pricing")
    assert choices(row) == [(0, "stop", "completed", "assistant")]


@pytest.mark.parametrize(
    ("body", "finish", "native"),
    [(RESPONSES_TOOL_CALL, "tool_calls", "completed"), (RESPONSES_INCOMPLETE, "length", "max_output_tokens")],
    ids=["function_call", "max_output_tokens"],
)
async def test_responses_finish_reasons(
    ledger: Ledger, upstream: FakeUpstream, body: dict[str, object], finish: str, native: str
) -> None:
    upstream.add("r", json_reply(body))
    tee = Tee()
    async with openai_client(ledger.url + "/v1", tee, "r") as client:
        response = await client.responses.create(model="o4-mini", input="Weather in Paris?", max_output_tokens=64)
    assert tee.body == orjson.dumps(body)
    assert response.status == body["status"]
    row = await ledger.row()
    assert choices(row) == [(0, finish, native, "assistant")]
    assert row["outcome"] == "ok"
    assert tokens(row) == responses_tokens(body["usage"])  # type: ignore[arg-type]
    assert row["cost"] == responses_cost(body["usage"])  # type: ignore[arg-type]


async def test_responses_error_status(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("r", json_reply(RESPONSES_ERROR_400, status=400))
    tee = Tee()
    async with openai_client(ledger.url + "/v1", tee, "r") as client:
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(model="gpt-9", input="hi")
    assert tee.body == orjson.dumps(RESPONSES_ERROR_400)
    row = await ledger.row()
    assert (row["api"], row["status_code"], row["outcome"]) == ("responses", 400, "upstream_error")
    assert row["error"] == RESPONSES_ERROR_400["error"]["message"]
    assert (row["prompt_tokens"], row["cost"], row["choices"]) == (None, None, [])


async def test_responses_stream(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("s", sse_reply(RESPONSES_STREAM))
    tee = Tee()
    async with openai_client(ledger.url + "/v1", tee, "s") as client:
        stream = await client.responses.create(model="o4-mini", input="Why is the sky blue?", stream=True)
        events = [event async for event in stream]
    assert tee.body == RESPONSES_STREAM
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "".join(RESPONSE_TEXT)
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage.total_tokens == RESPONSES_USAGE["total_tokens"]
    # nothing was added to the request: these streams carry usage unasked
    assert orjson.loads(upstream.requests[0].body) == {
        "input": "Why is the sky blue?",
        "model": "o4-mini",
        "stream": True,
    }
    row = await ledger.row()
    assert (row["api"], row["stream"], row["outcome"], row["error"]) == ("responses", True, "ok", None)
    assert (row["completion_id"], row["model"], row["created"]) == (RESPONSE_ID, "o4-mini-2025-04-16", RESPONSE_CREATED)
    assert tokens(row) == responses_tokens(RESPONSES_USAGE)
    assert row["cost"] == responses_cost(RESPONSES_USAGE)
    assert choices(row) == [(0, "stop", "completed", "assistant")]
    assert 0 < row["ttft_ms"] <= row["duration_ms"]


async def test_responses_stream_incomplete(ledger: Ledger, upstream: FakeUpstream) -> None:
    body = responses_stream(RESPONSES_INCOMPLETE, text=["The", " sky", " is"])
    upstream.add("s", sse_reply(body))
    tee = Tee()
    async with openai_client(ledger.url + "/v1", tee, "s") as client:
        stream = await client.responses.create(model="o4-mini", input="x", stream=True, max_output_tokens=64)
        events = [event async for event in stream]
    assert tee.body == body
    assert events[-1].type == "response.incomplete"
    row = await ledger.row()
    assert (row["outcome"], choices(row)) == ("ok", [(0, "length", "max_output_tokens", "assistant")])
    assert row["completion_tokens"] == RESPONSES_INCOMPLETE["usage"]["output_tokens"]


async def test_responses_stream_failed(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("s", sse_reply(RESPONSES_FAILED_STREAM))
    tee = Tee()
    async with openai_client(ledger.url + "/v1", tee, "s") as client:
        stream = await client.responses.create(model="o4-mini", input="x", stream=True)
        events = [event async for event in stream]
    assert tee.body == RESPONSES_FAILED_STREAM
    assert events[-1].type == "response.failed"
    row = await ledger.row()
    assert (row["status_code"], row["outcome"]) == (200, "upstream_error")
    assert row["error"] == RESPONSES_FAILED["error"]["message"]
    assert choices(row) == [(0, "error", "failed", "assistant")]
    assert (row["prompt_tokens"], row["cost"]) == (None, None)


async def test_responses_stream_error_event(ledger: Ledger, upstream: FakeUpstream) -> None:
    head = RESPONSES_STREAM[: RESPONSES_STREAM.index(b"event: response.output_text.done")]
    body = head + named_event(RESPONSES_ERROR_EVENT)
    upstream.add("s", sse_reply(body))
    tee = Tee()
    async with openai_client(ledger.url + "/v1", tee, "s") as client:
        stream = await client.responses.create(model="o4-mini", input="x", stream=True)
        events = [event async for event in stream]
    assert tee.body == body
    assert events[-1].type == "error"
    row = await ledger.row()
    assert (row["outcome"], row["error"]) == ("upstream_error", RESPONSES_ERROR_EVENT["message"])
    assert (row["completion_id"], row["model"]) == (RESPONSE_ID, "o4-mini-2025-04-16")
    assert row["prompt_tokens"] is None


async def test_responses_stream_cut_by_the_upstream(ledger: Ledger, upstream: FakeUpstream) -> None:
    cut = RESPONSES_STREAM.index(b"event: response.completed")
    upstream.add("s", sse_reply(RESPONSES_STREAM, cut_after=cut))
    tee = Tee()
    async with openai_client(ledger.url + "/v1", tee, "s") as client:
        stream = await client.responses.create(model="o4-mini", input="x", stream=True)
        with pytest.raises(openai.APIConnectionError):  # the proxy cut the client's connection too
            [event async for event in stream]
    assert RESPONSES_STREAM.startswith(tee.body)
    row = await ledger.row()
    assert row["outcome"] == "upstream_error"
    assert "mid-response" in row["error"]
    assert (row["completion_id"], row["prompt_tokens"]) == (RESPONSE_ID, None)


# ---- embeddings ---------------------------------------------------------------------------------


async def test_embeddings_create(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("e", echo_encoding(lambda request: embeddings_body(request.get("encoding_format", "float"))))
    tee = Tee()
    async with openai_client(ledger.url + "/v1", tee, "e") as client:
        result = await client.embeddings.create(model="text-embedding-3-small", input=["sky", "sea"])
    # the SDK asks for base64 and decodes it
    assert orjson.loads(upstream.requests[0].body)["encoding_format"] == "base64"
    assert tee.body == orjson.dumps(embeddings_body("base64"))
    decoded = [struct.unpack(f"<{len(v)}f", struct.pack(f"<{len(v)}f", *v)) for v in EMBEDDING_VECTORS]
    assert [tuple(item.embedding) for item in result.data] == decoded
    row = await ledger.row()
    assert (row["api"], row["outcome"], row["model"], row["object"]) == (
        "embeddings",
        "ok",
        "text-embedding-3-small",
        "list",
    )
    assert tokens(row) == {
        "prompt_tokens": EMBEDDINGS_USAGE["prompt_tokens"],
        "completion_tokens": None,
        "total_tokens": EMBEDDINGS_USAGE["total_tokens"],
        "cached_tokens": None,
        "cache_write_tokens": None,
        "reasoning_tokens": None,
    }
    rate = PRICES["text-embedding-3-small"]["prompt"]
    assert (row["cost"], row["cost_source"]) == (usd((EMBEDDINGS_USAGE["prompt_tokens"], rate)), "pricing")
    assert row["choices"] == []


def test_base64_fixture_is_float32() -> None:
    encoded = embeddings_body("base64")["data"][0]["embedding"]
    assert len(base64.b64decode(encoded)) == 4 * len(EMBEDDING_VECTORS[0])


# ---- legacy completions -------------------------------------------------------------------------


def text_cost(usage: dict[str, int]) -> Decimal:
    rates = PRICES["gpt-3.5-turbo-instruct*"]
    return usd((usage["prompt_tokens"], rates["prompt"]), (usage["completion_tokens"], rates["completion"]))


async def test_completions_create(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("c", json_reply(TEXT_COMPLETION))
    tee = Tee()
    async with openai_client(ledger.url + "/v1", tee, "c") as client:
        result = await client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="Say this is a test", max_tokens=7, user="u-3"
        )
    assert tee.body == orjson.dumps(TEXT_COMPLETION)
    assert result.choices[0].text == TEXT_COMPLETION["choices"][0]["text"]
    row = await ledger.row()
    assert (row["api"], row["outcome"], row["object"], row["user"]) == ("completions", "ok", "text_completion", "u-3")
    assert (row["completion_id"], row["model"]) == (TEXT_COMPLETION["id"], TEXT_COMPLETION["model"])
    usage = TEXT_COMPLETION["usage"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
    )
    assert row["cost"] == text_cost(usage)
    assert choices(row) == [(0, "length", None, None)]


async def answer_text_stream(request: web.Request, body: bytes) -> web.StreamResponse:
    """Like OpenAI: the usage-only chunk only when the request asked for it."""
    options = orjson.loads(body).get("stream_options") or {}
    return await sse_reply(text_completion_stream(usage=options.get("include_usage") is True))(request, body)


@pytest.mark.parametrize("asks_usage", [False, True], ids=["usage_injected", "usage_asked"])
async def test_completions_stream(ledger: Ledger, upstream: FakeUpstream, asks_usage: bool) -> None:
    """Legacy completion streams carry usage only when asked, like chat: the proxy asks for the client
    and cuts the usage chunk out of what that client gets."""
    upstream.add("c", answer_text_stream)
    tee = Tee()
    extra = {"stream_options": {"include_usage": True}} if asks_usage else {}
    async with openai_client(ledger.url + "/v1", tee, "c") as client:
        stream = await client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="Say this is a test", stream=True, **extra
        )
        chunks = [chunk async for chunk in stream]
    assert orjson.loads(upstream.requests[0].body)["stream_options"] == {"include_usage": True}
    assert tee.body == text_completion_stream(usage=asks_usage)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(TEXT_PIECES)
    assert any(c.usage is not None for c in chunks) == asks_usage
    row = await ledger.row()
    assert (row["api"], row["stream"], row["outcome"]) == ("completions", True, "ok")
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == tuple(
        TEXT_STREAM_USAGE[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    )
    assert row["cost"] == text_cost(TEXT_STREAM_USAGE)
    assert choices(row) == [(0, "stop", None, None)]
    assert 0 < row["ttft_ms"] <= row["duration_ms"]


# ---- OpenRouter BYOK ----------------------------------------------------------------------------


async def test_openrouter_byok_cost_is_the_fee_plus_the_providers_charge(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    upstream.add("b", json_reply(BYOK_COMPLETION))
    tee = Tee()
    async with openai_client(ledger.url + "/api/v1", tee, "b") as client:
        await client.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert tee.body == orjson.dumps(BYOK_COMPLETION)
    row = await ledger.row()
    usage = BYOK_COMPLETION["usage"]
    fee, charge = Decimal(str(usage["cost"])), Decimal(str(usage["cost_details"]["upstream_inference_cost"]))
    assert (row["cost"], row["cost_source"]) == (fee + charge, "upstream")
    assert row["usage"] == usage
