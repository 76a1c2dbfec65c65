"""The official anthropic client through the proxy: Messages as JSON and streamed (messages.create,
messages.stream), errors before and during a stream, and OpenRouter's Anthropic-compatible endpoint.
The client gets the upstream's bytes; each call is one row, checked field by field, tokens in OpenAI's
convention (prompt_tokens = input + cache reads + cache writes), on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from .api_payloads import (
    MESSAGE_BASIC,
    MESSAGE_ID,
    MESSAGE_MODEL,
    MESSAGE_OVERLOADED,
    MESSAGE_STREAM,
    MESSAGE_TEXT,
    MESSAGE_TOOL_USE,
    MESSAGE_USAGE,
    STREAM_DELTA_USAGE,
    STREAM_START_USAGE,
    message_body,
    message_stream,
)
from .conftest import Ledger, start_ledger
from .sdk_helpers import (
    KEY,
    KEY_HASH,
    PRICES,
    Tee,
    anthropic_client,
    choices,
    priced_config,
    priced_ledger,
    tokens,
    usd,
)
from .upstream import FakeUpstream, json_reply, sse_reply

ASK = {"max_tokens": 1024, "messages": [{"role": "user", "content": "Why is the sky blue?"}]}


@pytest.fixture
async def ledger(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    proxy = await priced_ledger(upstream.url, database_url, tmp_path)
    yield proxy
    await proxy.stop()


def expected_tokens(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's convention from Anthropic's counts, worked out by hand."""
    read, written = usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]
    prompt = usage["input_tokens"] + read + written
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage["output_tokens"],
        "total_tokens": prompt + usage["output_tokens"],
        "cached_tokens": read,
        "cache_write_tokens": written,
        "reasoning_tokens": None,
    }


def expected_cost(usage: dict[str, Any], prices: str = "claude-sonnet-4-5*") -> Decimal:
    rates = PRICES[prices]
    return usd(
        (usage["input_tokens"], rates["prompt"]),
        (usage["cache_read_input_tokens"], rates["cache_read"]),
        (usage["cache_creation_input_tokens"], rates["cache_write"]),
        (usage["output_tokens"], rates["completion"]),
    )


async def test_messages_create(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("m", json_reply(MESSAGE_BASIC, headers={"request-id": "req_011CSHoEeqs5C35K2UUqR7Fy"}))
    tee = Tee()
    async with anthropic_client(ledger.url, tee, "m") as client:
        message = await client.messages.create(
            model="claude-sonnet-4-5", metadata={"user_id": "user-42"}, **ASK  # type: ignore[arg-type]
        )
    assert tee.body == orjson.dumps(MESSAGE_BASIC)
    assert message.content[0].text == "".join(MESSAGE_TEXT)  # type: ignore[union-attr]
    sent = upstream.requests[0]
    assert (sent.path_qs, sent.headers["x-api-key"]) == ("/v1/messages", KEY)
    row = await ledger.row()
    assert {k: row[k] for k in ("api", "path", "status_code", "outcome", "error", "stream")} == {
        "api": "messages",
        "path": "/v1/messages",
        "status_code": 200,
        "outcome": "ok",
        "error": None,
        "stream": False,
    }
    assert (row["completion_id"], row["object"], row["model"]) == (MESSAGE_ID, "message", MESSAGE_MODEL)
    assert (row["requested_model"], row["service_tier"]) == ("claude-sonnet-4-5", "standard")
    assert (row["user"], row["api_key_hash"]) == ("user-42", KEY_HASH)  # the x-api-key, fingerprinted
    assert KEY not in repr(row)
    assert row["upstream_request_id"] == "req_011CSHoEeqs5C35K2UUqR7Fy"
    assert tokens(row) == expected_tokens(MESSAGE_USAGE)
    assert row["usage"] == MESSAGE_USAGE
    assert (row["cost"], row["cost_source"]) == (expected_cost(MESSAGE_USAGE), "pricing")
    assert choices(row) == [(0, "stop", "end_turn", "assistant")]


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("tool_use", "tool_calls"), ("max_tokens", "length"), ("refusal", "content_filter"), ("stop_sequence", "stop")],
)
async def test_messages_stop_reasons(ledger: Ledger, upstream: FakeUpstream, stop_reason: str, finish: str) -> None:
    body = {**MESSAGE_TOOL_USE, "stop_reason": stop_reason}
    upstream.add("m", json_reply(body))
    tee = Tee()
    async with anthropic_client(ledger.url, tee, "m") as client:
        message = await client.messages.create(model="claude-sonnet-4-5", **ASK)  # type: ignore[arg-type]
    assert message.stop_reason == stop_reason
    assert tee.body == orjson.dumps(body)
    row = await ledger.row()
    assert choices(row) == [(0, finish, stop_reason, "assistant")]
    assert tokens(row) == expected_tokens(MESSAGE_TOOL_USE["usage"])


async def test_messages_overloaded(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("m", json_reply(MESSAGE_OVERLOADED, status=529))
    tee = Tee()
    async with anthropic_client(ledger.url, tee, "m") as client:
        with pytest.raises(anthropic.APIStatusError) as raised:
            await client.messages.create(model="claude-sonnet-4-5", **ASK)  # type: ignore[arg-type]
    assert raised.value.status_code == 529
    assert tee.body == orjson.dumps(MESSAGE_OVERLOADED)
    row = await ledger.row()
    assert (row["api"], row["status_code"], row["outcome"], row["error"]) == (
        "messages",
        529,
        "upstream_error",
        "Overloaded",
    )
    assert (row["prompt_tokens"], row["cost"], row["choices"]) == (None, None, [])


def merged_stream_usage() -> dict[str, Any]:
    """message_start's usage, each field message_delta reports replaced by its (cumulative) value."""
    return {**STREAM_START_USAGE, **STREAM_DELTA_USAGE}


async def test_messages_stream_helper(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("s", sse_reply(MESSAGE_STREAM))
    tee = Tee()
    async with (
        anthropic_client(ledger.url, tee, "s") as client,
        client.messages.stream(model="claude-sonnet-4-5", **ASK) as stream,  # type: ignore[arg-type]
    ):
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert tee.body == MESSAGE_STREAM
    assert text == "".join(MESSAGE_TEXT)
    usage = merged_stream_usage()
    assert final.usage.output_tokens == usage["output_tokens"]
    assert final.usage.cache_read_input_tokens == usage["cache_read_input_tokens"]
    row = await ledger.row()
    assert (row["api"], row["stream"], row["outcome"], row["error"]) == ("messages", True, "ok", None)
    assert (row["completion_id"], row["model"], row["service_tier"]) == (MESSAGE_ID, MESSAGE_MODEL, "standard")
    # merged field by field: input counted once, output the last cumulative value
    assert tokens(row) == expected_tokens(usage)
    assert row["usage"] == usage
    assert row["cost"] == expected_cost(usage)
    assert choices(row) == [(0, "stop", "end_turn", "assistant")]
    assert 0 < row["ttft_ms"] <= row["duration_ms"]


async def test_messages_create_stream_with_only_output_in_the_delta(ledger: Ledger, upstream: FakeUpstream) -> None:
    """Older API versions: message_delta's usage has output_tokens alone; the rest comes from message_start."""
    delta = {"output_tokens": 57}
    body = message_stream(stop_reason="max_tokens", delta_usage=delta)
    upstream.add("s", sse_reply(body))
    tee = Tee()
    async with anthropic_client(ledger.url, tee, "s") as client:
        stream = await client.messages.create(model="claude-sonnet-4-5", stream=True, **ASK)  # type: ignore[arg-type]
        events = [event async for event in stream]
    assert tee.body == body
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
    row = await ledger.row()
    usage = {**STREAM_START_USAGE, **delta}
    assert tokens(row) == expected_tokens(usage)
    assert choices(row) == [(0, "length", "max_tokens", "assistant")]


async def test_messages_stream_error_event(ledger: Ledger, upstream: FakeUpstream) -> None:
    body = message_stream(error_after=3)
    upstream.add("s", sse_reply(body))
    tee = Tee()
    async with anthropic_client(ledger.url, tee, "s") as client:
        stream = await client.messages.create(model="claude-sonnet-4-5", stream=True, **ASK)  # type: ignore[arg-type]
        with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
            [event async for event in stream]
    assert tee.body == body
    row = await ledger.row()
    assert (row["status_code"], row["outcome"], row["error"]) == (200, "upstream_error", "Overloaded")
    assert (row["completion_id"], row["model"]) == (MESSAGE_ID, MESSAGE_MODEL)
    # what message_start reported: the input, and the output counted so far
    assert tokens(row) == expected_tokens(STREAM_START_USAGE)
    assert choices(row) == [(0, None, None, "assistant")]


async def test_messages_stream_that_ends_without_message_stop(ledger: Ledger, upstream: FakeUpstream) -> None:
    body = MESSAGE_STREAM[: MESSAGE_STREAM.index(b"event: content_block_stop")]
    upstream.add("s", sse_reply(body))
    tee = Tee()
    async with anthropic_client(ledger.url, tee, "s") as client:
        stream = await client.messages.create(model="claude-sonnet-4-5", stream=True, **ASK)  # type: ignore[arg-type]
        [event async for event in stream]
    assert tee.body == body
    row = await ledger.row()
    assert row["outcome"] == "upstream_error"
    assert row["error"].startswith("stream ended before the response finished")


async def test_openrouter_anthropic_compatible_endpoint(ledger: Ledger, upstream: FakeUpstream) -> None:
    """OpenRouter's Anthropic skin: base URL https://openrouter.ai/api, key as a bearer token, its own
    model names; the Messages format all the same."""
    body = message_body(model="anthropic/claude-sonnet-4.5")
    upstream.add("m", json_reply(body, headers={"x-generation-id": "gen-1756500000-Msg9"}))
    tee = Tee()
    async with anthropic_client(ledger.url + "/api", tee, "m", bearer=True) as client:
        await client.messages.create(model="anthropic/claude-sonnet-4.5", **ASK)  # type: ignore[arg-type]
    assert tee.body == orjson.dumps(body)
    sent = upstream.requests[0]
    assert (sent.path_qs, sent.headers["authorization"]) == ("/api/v1/messages", f"Bearer {KEY}")
    row = await ledger.row()
    assert (row["api"], row["path"], row["model"], row["api_key_hash"]) == (
        "messages",
        "/api/v1/messages",
        "anthropic/claude-sonnet-4.5",
        KEY_HASH,
    )
    assert row["upstream_request_id"] == "gen-1756500000-Msg9"
    assert tokens(row) == expected_tokens(MESSAGE_USAGE)
    assert row["cost"] == expected_cost(MESSAGE_USAGE, "anthropic/*")


async def test_the_writer_process_parses_messages_streams(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    """The default writer (a process of its own) folds the stream from the capture it is sent."""
    config = priced_config(upstream.url, database_url, tmp_path, database={"writer": "process"})
    proxy = await start_ledger(config)
    try:
        upstream.add("s", sse_reply(MESSAGE_STREAM))
        tee = Tee()
        async with (
            anthropic_client(proxy.url, tee, "s") as client,
            client.messages.stream(model="claude-sonnet-4-5", **ASK) as stream,  # type: ignore[arg-type]
        ):
            await stream.get_final_message()
        assert tee.body == MESSAGE_STREAM
        row = await proxy.row()
    finally:
        await proxy.stop()
    usage = merged_stream_usage()
    assert (row["api"], row["outcome"], row["completion_id"]) == ("messages", "ok", MESSAGE_ID)
    assert tokens(row) == expected_tokens(usage)
    assert row["cost"] == expected_cost(usage)
