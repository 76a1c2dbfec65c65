"""Property tests (hypothesis) for the parsers of the non-chat APIs: any JSON or bytes, as a body or as a
stream of named events, gives a record every database and the spool accept; nothing raises; the merged
Anthropic usage stays bounded.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.parse.formats import FORMATS
from proxy.parse.messages_stream import MAX_USAGE_FIELDS, READ_FIELDS, MessagesFolder
from proxy.parse.record import CompletionRecord
from proxy.parse.usage import apply_cost, apply_messages_usage

from .test_fuzz import FUZZ, SCALARS, assert_storable, new_record

pytestmark = pytest.mark.slow

KEYS = st.sampled_from(
    [
        "id", "type", "object", "model", "status", "created_at", "output", "incomplete_details", "reason",
        "error", "message", "code", "response", "usage", "input_tokens", "output_tokens", "total_tokens",
        "input_tokens_details", "output_tokens_details", "cached_tokens", "cache_write_tokens",
        "reasoning_tokens", "thinking_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
        "cache_creation", "ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens", "service_tier",
        "stop_reason", "delta", "role", "content", "data", "prompt_tokens", "cost", "is_byok",
        "cost_details", "upstream_inference_cost", "provider",
    ]
) | st.text(max_size=8)  # fmt: skip
TYPES = st.sampled_from(
    [
        "response.created", "response.in_progress", "response.completed", "response.incomplete",
        "response.failed", "response.output_text.delta", "error", "message_start", "message_delta",
        "message_stop", "content_block_delta", "ping", "message", "function_call", "completed", "incomplete",
        "failed", "queued", "end_turn", "tool_use", "max_output_tokens",
    ]
)  # fmt: skip
VALUES = st.recursive(
    SCALARS | TYPES,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(KEYS, children, max_size=6),
    max_leaves=40,
)
OBJECTS = st.dictionaries(KEYS, VALUES, max_size=8) | st.fixed_dictionaries(
    {"type": TYPES}, optional={"response": VALUES, "message": VALUES, "delta": VALUES, "usage": VALUES}
)
EVENTS = st.lists(
    st.tuples(OBJECTS.map(orjson.dumps) | st.binary(max_size=40), TYPES.map(str.encode) | st.just(b"")),
    max_size=12,
)
API_NAMES = st.sampled_from(["responses", "messages", "embeddings", "completions"])


def record_for(api: str) -> CompletionRecord:
    record = new_record()
    record.api = api
    return record


@FUZZ
@given(api=API_NAMES, obj=OBJECTS | VALUES)
def test_bodies_any_json(api: str, obj: Any) -> None:
    record = record_for(api)
    assert FORMATS[api].parse_body(record, orjson.dumps(obj)) in (True, False)
    assert_storable(record)


@FUZZ
@given(api=API_NAMES, body=st.binary(max_size=200))
def test_bodies_any_bytes(api: str, body: bytes) -> None:
    record = record_for(api)
    assert FORMATS[api].parse_body(record, body) in (True, False)
    assert_storable(record)


@FUZZ
@given(api=st.sampled_from(["responses", "messages"]), events=EVENTS, settle=st.booleans(), at_eof=st.booleans())
def test_stream_folds_any_events(api: str, events: list[tuple[bytes, bytes]], settle: bool, at_eof: bool) -> None:
    record = record_for(api)
    folder = FORMATS[api].new_folder(record, 1)  # type: ignore[misc]
    if settle:  # a first content delta: later events are then passed over by name
        folder.feed(b'{"type":"content_block_delta"}', b"content_block_delta")
        folder.feed(b'{"type":"response.output_text.delta"}', b"response.output_text.delta")
    for data, name in events:
        carries, usage_only = folder.feed(data, name)
        assert isinstance(carries, bool)
        assert usage_only is False
    folder.finish(at_eof=at_eof)
    assert len(record.choices) <= 1
    assert_storable(record)


@FUZZ
@given(usage=st.dictionaries(KEYS, VALUES, max_size=10))
def test_usage_mappers_any_object(usage: dict[str, Any]) -> None:
    record = new_record()
    apply_messages_usage(record, usage)
    assert_storable(record)
    apply_cost(record, usage)
    assert_storable(record)


def test_merged_message_usage_is_bounded() -> None:
    record = record_for("messages")
    folder = MessagesFolder(record)
    folder.feed(orjson.dumps({"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 5}}}))
    for start in range(0, 10_000, 500):
        usage = {f"field_{n}": n for n in range(start, start + 500)}
        folder.feed(orjson.dumps({"type": "message_delta", "delta": {}, "usage": {**usage, "output_tokens": 9}}))
    folder.feed(b'{"type":"message_stop"}')
    folder.finish(at_eof=True)
    assert folder.usage is not None
    assert MAX_USAGE_FIELDS <= len(folder.usage) <= MAX_USAGE_FIELDS + len(READ_FIELDS)
    assert (folder.usage["input_tokens"], folder.usage["output_tokens"]) == (5, 9)  # known fields still update
    assert (record.prompt_tokens, record.completion_tokens) == (5, 9)
    assert_storable(record)
