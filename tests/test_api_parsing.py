"""Pure parsing of the non-chat APIs: JSON bodies, the Responses and Messages stream folds fed at every
split point and as the writer feeds them (whole captured streams, the settled middle skipped), usage
conventions, finish-reason vocabularies, which paths are which API, and the cost rules (BYOK,
embeddings). Expected values come from the fixtures' inputs, never from the parser's output.
"""

from __future__ import annotations

import random
from dataclasses import astuple
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from proxy.config import ModelPrice
from proxy.parse.capture import Capture, materialize
from proxy.parse.event_fold import STREAM_CUT_OFF
from proxy.parse.formats import FORMATS
from proxy.parse.messages import STOP_REASONS, parse_message_body
from proxy.parse.record import CompletionRecord
from proxy.parse.responses import parse_response_body
from proxy.parse.stream_tap import StreamTap
from proxy.parse.usage import apply_messages_usage, apply_usage
from proxy.relay.routing import api_of
from proxy.store.pricing.book import PriceBook, PriceEntry, compute_cost

from .api_payloads import (
    BYOK_USAGE,
    MESSAGE_STREAM,
    RESPONSES_BASIC,
    RESPONSES_FAILED_STREAM,
    RESPONSES_STREAM,
    STREAM_DELTA_USAGE,
    STREAM_START_USAGE,
    message_stream,
    named_event,
    response_object,
    responses_stream,
    text_completion_stream,
)

STARTED = datetime(2026, 1, 1, tzinfo=UTC)
FIELDS = (
    "completion_id",
    "model",
    "object",
    "created",
    "service_tier",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost",
    "error",
)


def new_record(api: str) -> CompletionRecord:
    return CompletionRecord("req", STARTED, "POST", "/v1/x", "http://u", api=api)


def fold(api: str, pieces: list[bytes], whole: bool = False) -> tuple[CompletionRecord, StreamTap]:
    record = new_record(api)
    folder = FORMATS[api].new_folder(record, 1)  # type: ignore[misc]
    tap = StreamTap(record, None, strip_usage_chunk=False, folder=folder)
    times = [float(n) for n in range(1, len(pieces) + 1)]
    if whole:
        tap.feed_all(pieces, times)
    else:
        for piece, at in zip(pieces, times, strict=True):
            assert tap.feed(piece, at) == piece  # never holds bytes back
    tap.close(len(pieces) + 1.0)
    return record, tap


def summary(record: CompletionRecord, tap: StreamTap) -> tuple[Any, ...]:
    return (
        tuple(getattr(record, name) for name in FIELDS),
        [astuple(choice) for choice in record.choices],
        record.usage,
        tap.folder.failed,
        tap.first_content_at is not None,
    )


def blocks_of(body: bytes) -> list[bytes]:
    return [block + b"\n\n" for block in body.split(b"\n\n") if block]


# streams whose record the fold must get the same whatever the reads
STREAMS = {
    "responses": ("responses", RESPONSES_STREAM),
    "responses_failed": ("responses", RESPONSES_FAILED_STREAM),
    "messages": ("messages", MESSAGE_STREAM),
    "messages_error": ("messages", message_stream(error_after=4)),
    "messages_spaced": (  # Anthropic's docs show JSON with spaces after the colons
        "messages",
        MESSAGE_STREAM.replace(b'":', b'": ').replace(b'",', b'", '),
    ),
    "completions": ("completions", text_completion_stream(usage=True)),
}


@pytest.mark.parametrize("name", STREAMS)
def test_stream_folds_the_same_at_every_split_point(name: str) -> None:
    api, body = STREAMS[name]
    want = summary(*fold(api, [body]))
    for cut in range(1, len(body)):
        assert summary(*fold(api, [body[:cut], body[cut:]])) == want, cut


@pytest.mark.parametrize("name", STREAMS)
def test_stream_folds_the_same_read_by_read_and_whole(name: str) -> None:
    """The writer folds a captured stream with feed_all, which leaves the settled middle unparsed."""
    api, body = STREAMS[name]
    want = summary(*fold(api, [body]))
    rng = random.Random(name)
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(1, 50)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert summary(*fold(api, pieces)) == want
        assert summary(*fold(api, pieces, whole=True)) == want
    blocks = blocks_of(body)
    for per_read in (1, 2, 5):
        reads = [b"".join(blocks[i : i + per_read]) for i in range(0, len(blocks), per_read)]
        assert summary(*fold(api, reads, whole=True)) == want


def long_responses_stream(words: int, text: str = "word") -> bytes:
    return responses_stream(RESPONSES_BASIC, text=[f" {text}{n}" for n in range(words)])


def test_a_long_responses_stream_is_mostly_not_parsed() -> None:
    body = long_responses_stream(500)
    record, tap = fold("responses", blocks_of(body), whole=True)
    assert record.completion_id == RESPONSES_BASIC["id"]
    assert record.total_tokens == RESPONSES_BASIC["usage"]["total_tokens"]
    assert [(c.finish_reason, c.native_finish_reason) for c in record.choices] == [("stop", "completed")]
    assert tap.folder.parsed_events < 12, tap.folder.parsed_events
    read_by_read, tap = fold("responses", blocks_of(body))
    assert summary(record, tap)[:3] == summary(read_by_read, tap)[:3]
    assert tap.folder.parsed_events < 12  # deltas passed over by event name


@pytest.mark.parametrize(
    "text",
    ['say "response" twice', 'a "message_delta" quote', 'an "error" word', "caf\\u00e9"],
)
def test_marker_words_in_content_are_parsed_not_misread(text: str) -> None:
    """Content that spells a marker only costs a parse: the record stays right."""
    for api, body in (
        ("responses", long_responses_stream(50, text)),
        ("messages", message_stream(text=[f"{text} {n}" for n in range(50)])),
    ):
        want = summary(*fold(api, [body]))
        assert summary(*fold(api, blocks_of(body), whole=True)) == want
        assert want[0][FIELDS.index("error")] is None


def test_responses_events_without_event_lines_are_folded() -> None:
    """A gateway may send only `data:` lines: the type inside the JSON decides."""
    body = b"".join(
        block.split(b"\n", 1)[1] for block in blocks_of(RESPONSES_STREAM)  # drop each `event:` line
    )
    record, tap = fold("responses", blocks_of(body), whole=True)
    want, _ = fold("responses", [RESPONSES_STREAM])
    assert summary(record, tap)[:3] == summary(want, tap)[:3]


def test_a_stream_cut_before_its_terminal_event_is_an_error() -> None:
    for api, body, end in (
        ("responses", RESPONSES_STREAM, b"event: response.completed"),
        ("messages", MESSAGE_STREAM, b"event: message_stop"),
    ):
        record, tap = fold(api, [body[: body.index(end)]])
        assert tap.folder.failed
        assert record.error == STREAM_CUT_OFF


def test_messages_usage_is_merged_field_by_field_never_summed() -> None:
    record, _ = fold("messages", [MESSAGE_STREAM])
    merged = {**STREAM_START_USAGE, **STREAM_DELTA_USAGE}
    assert record.usage == merged
    prompt = merged["input_tokens"] + merged["cache_read_input_tokens"] + merged["cache_creation_input_tokens"]
    assert (record.prompt_tokens, record.completion_tokens) == (prompt, merged["output_tokens"])


def test_a_messages_delta_with_nulls_keeps_the_start_values() -> None:
    delta = {"input_tokens": None, "cache_read_input_tokens": None, "output_tokens": 12}
    record, _ = fold("messages", [message_stream(delta_usage=delta)])
    assert record.cached_tokens == STREAM_START_USAGE["cache_read_input_tokens"]
    assert record.completion_tokens == 12


def test_the_gap_of_an_overflowed_responses_stream_keeps_the_terminal_event() -> None:
    body = long_responses_stream(2000)
    record = new_record("responses")
    tap = StreamTap(record, None, strip_usage_chunk=False, folder=FORMATS["responses"].new_folder(record, 1))  # type: ignore[misc]
    head, tail = body[:3000], body[-6000:]
    tap.feed_all([head], [1.0])
    tap.resume_after_gap(tail, 2.0)
    tap.close(3.0)
    assert record.total_tokens == RESPONSES_BASIC["usage"]["total_tokens"]
    assert not tap.folder.failed


# ---- JSON bodies --------------------------------------------------------------------------------


def incomplete(reason: str) -> dict[str, Any]:
    return {"status": "incomplete", "incomplete_details": {"reason": reason}}


@pytest.mark.parametrize(
    ("changes", "finish", "native"),
    [
        ({}, "stop", "completed"),
        ({"output": [{"type": "custom_tool_call", "call_id": "c", "name": "n"}]}, "tool_calls", "completed"),
        ({"output": [{"type": "web_search_call", "id": "ws", "status": "completed"}]}, "stop", "completed"),
        (incomplete("content_filter"), "content_filter", "content_filter"),
        (incomplete("max_output_tokens"), "length", "max_output_tokens"),
        ({"status": "incomplete", "incomplete_details": None}, "incomplete", "incomplete"),
        ({"status": "failed", "error": {"code": "server_error", "message": "boom"}}, "error", "failed"),
        ({"status": "cancelled"}, "cancelled", "cancelled"),
        ({"status": "queued", "usage": None}, None, "queued"),
        ({"status": 7}, None, None),
    ],
)
def test_responses_status_to_finish_reason(changes: dict[str, Any], finish: str | None, native: str | None) -> None:
    record = new_record("responses")
    assert parse_response_body(record, orjson.dumps(response_object(**changes)))
    assert [(c.index, c.finish_reason, c.native_finish_reason, c.role) for c in record.choices] == [
        (0, finish, native, "assistant")
    ]
    assert (record.error is not None) == (finish == "error")


@pytest.mark.parametrize(("native", "finish"), [*STOP_REASONS.items(), ("new_reason", "new_reason")])
def test_anthropic_stop_reason_to_finish_reason(native: str, finish: str) -> None:
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": native}
    record = new_record("messages")
    assert parse_message_body(record, orjson.dumps(body))
    assert [(c.finish_reason, c.native_finish_reason) for c in record.choices] == [(finish, native)]


def test_the_issues_finish_vocabulary() -> None:
    assert STOP_REASONS["end_turn"] == STOP_REASONS["stop_sequence"] == "stop"
    assert (STOP_REASONS["max_tokens"], STOP_REASONS["tool_use"], STOP_REASONS["refusal"]) == (
        "length",
        "tool_calls",
        "content_filter",
    )


@pytest.mark.parametrize(
    "body",
    [b"[]", b"not json", b'{"object":"list"}', b'{"type":"message_batch"}', b'{"error":null}'],
)
def test_bodies_that_are_no_answer_are_not_parsed(body: bytes) -> None:
    for api in ("responses", "messages", "embeddings"):
        record = new_record(api)
        assert not FORMATS[api].parse_body(record, body), (api, body)
        assert (record.prompt_tokens, record.choices) == (None, [])


def test_anthropic_usage_in_openai_convention() -> None:
    record = new_record("messages")
    usage = {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50, "output_tokens": 7}
    apply_messages_usage(record, usage)
    assert (record.prompt_tokens, record.cached_tokens, record.cache_write_tokens) == (160, 100, 50)
    assert (record.completion_tokens, record.total_tokens) == (7, 167)
    # cache writes reported only split by lifetime; thinking tokens
    apply_messages_usage(
        record,
        {
            "input_tokens": 10,
            "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 20},
            "output_tokens": 7,
            "output_tokens_details": {"thinking_tokens": 5},
        },
    )
    assert (record.prompt_tokens, record.cached_tokens, record.cache_write_tokens) == (60, None, 50)
    assert record.reasoning_tokens == 5
    apply_messages_usage(record, {"output_tokens": 7})  # input unknown: prompt and total unknown
    assert (record.prompt_tokens, record.total_tokens, record.completion_tokens) == (None, None, 7)


# ---- cost ---------------------------------------------------------------------------------------


def test_byok_cost_is_the_fee_plus_the_providers_charge() -> None:
    record = new_record("chat")
    apply_usage(record, BYOK_USAGE)
    fee = Decimal(str(BYOK_USAGE["cost"]))
    assert record.cost == fee + Decimal(str(BYOK_USAGE["cost_details"]["upstream_inference_cost"]))
    assert record.cost_source == "upstream"
    apply_usage(record, {**BYOK_USAGE, "is_byok": False})  # not BYOK: cost is the whole charge
    assert record.cost == fee
    apply_usage(record, {**BYOK_USAGE, "cost_details": {"upstream_inference_cost": None}})
    assert (record.cost, record.cost_source) == (None, None)  # the fee alone is not the call's cost


def test_embeddings_are_priced_at_the_input_rate() -> None:
    price = ModelPrice(Decimal("0.13"), Decimal(0))
    assert compute_cost(price, 1000, None) is None
    assert compute_cost(price, 1000, None, input_only=True) == Decimal("0.00013")
    entry = PriceEntry("text-embedding-3-large", STARTED, Decimal("0.13"), Decimal("5"))
    record = new_record("embeddings")
    record.model, record.prompt_tokens = "text-embedding-3-large", 2000
    PriceBook([entry]).apply([record])
    assert (record.cost, record.cost_source) == (Decimal("0.00026"), "pricing")


# ---- which API a call is ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "api"),
    [
        ("POST", "/v1/chat/completions", "chat"),
        ("POST", "/api/v1/chat/completions", "chat"),
        ("POST", "/openai/deployments/gpt4/chat/completions", "chat"),
        ("POST", "/v1/completions", "completions"),
        ("POST", "/v1/responses", "responses"),
        ("POST", "/openai/v1/responses", "responses"),
        ("POST", "/v1/embeddings", "embeddings"),
        ("POST", "/v1/messages", "messages"),
        ("POST", "/api/v1/messages", "messages"),
        ("GET", "/v1/responses", None),
        ("POST", "/v1/responses/resp_1", None),
        ("POST", "/v1/responses/resp_1/cancel", None),
        ("POST", "/v1/responses/input_tokens", None),
        ("POST", "/v1/messages/count_tokens", None),
        ("POST", "/v1/messages/batches", None),
        ("POST", "/v1/threads/thread_1/messages", None),
        ("POST", "/v1/batches", None),
        ("POST", "/v1/chat/completions/chatcmpl-1", None),
        ("POST", "/v1/moderations", None),
        ("POST", "/", None),
        ("POST", "", None),
    ],
)
def test_api_of(method: str, path: str, api: str | None) -> None:
    assert api_of(method, path) == api


def test_materialize_parses_by_the_captures_api() -> None:
    """The same bytes parse as the API the relay named, and as nothing for a path only logged."""
    body = orjson.dumps(response_object())
    common: dict[str, Any] = {
        "request_id": "r",
        "started_wall": 1.0,
        "started": 1.0,
        "method": "POST",
        "path": "/v1/responses",
        "upstream": "http://u",
        "api_key_hash": None,
        "secrets": (),
        "tag_headers": None,
        "user_header": None,
        "request_body": b'{"model":"o4-mini","user":"u1"}',
        "status": 200,
        "upstream_request_id": None,
        "encoding": None,
        "event_stream": False,
        "headers_at": 1.1,
        "chunks": [body],
        "times": None,
        "finished": 1.2,
        "overflow": False,
        "failure": None,
    }
    parsed = materialize(Capture(api="responses", **common))
    assert (parsed.api, parsed.outcome, parsed.requested_model, parsed.user) == ("responses", "ok", "o4-mini", "u1")
    assert parsed.total_tokens == RESPONSES_BASIC["usage"]["total_tokens"]
    logged = materialize(Capture(api=None, **common))
    assert (logged.api, logged.outcome, logged.total_tokens, logged.requested_model) == (None, "ok", None, None)
    garbled = materialize(Capture(api="messages", **common))
    assert (garbled.outcome, garbled.error) == ("unparsed", "response could not be parsed as an Anthropic message")


def test_named_event_fixture_is_sse() -> None:
    assert named_event({"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
