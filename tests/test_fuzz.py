"""Property tests (hypothesis) for the pure parsing code: nothing raises, memory stays bounded, and
whatever the parser produces can be written to the spool.

- SSEDecoder: any bytes, split anywhere, give the same events as fed whole; events and held bytes
  never exceed max_event_bytes.
- parse_completion_body / StreamFolder: any JSON (or bytes) gives a record whose columns have their
  types and ranges (the database would refuse anything else).
- inspect_request: any body; when usage is injected, the body is the client's JSON plus
  stream_options.include_usage and nothing else.
- StreamTap: without stripping the client gets exactly the upstream bytes; with it, a subsequence, the
  same whether the tap folds the record or only cuts the usage chunk (strip_only).
"""

from __future__ import annotations

import os
import tracemalloc
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.parse.capture import finish_error
from proxy.parse.chat_json import parse_completion_body
from proxy.parse.chat_stream import StreamFolder
from proxy.parse.fields import MAX_ERROR_CHARS, RAW_ERROR_CHARS
from proxy.parse.record import CompletionRecord
from proxy.parse.request import inspect_request
from proxy.parse.sse import SSEDecoder
from proxy.parse.stream_tap import StreamTap
from proxy.relay.policy import (
    HOP_BY_HOP,
    STEERING_HEADERS,
    filter_request_headers,
    filter_response_headers,
    forwardable_request_headers,
    forwardable_response_headers,
)
from proxy.store.rows import record_to_row
from proxy.writer.spool import encode_row

from .test_completion_parsing import TOKEN_COLUMNS as PARSED_TOKEN_COLUMNS

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("CHATLEDGER_FUZZ_EXAMPLES", "300"))  # raise it for a deeper run
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKEN_COLUMNS = (*PARSED_TOKEN_COLUMNS, "created")
TEXT_COLUMNS = ("completion_id", "object", "model", "provider", "system_fingerprint", "service_tier", "error")

KEYS = st.sampled_from(
    [
        "id", "object", "created", "model", "provider", "system_fingerprint", "service_tier", "choices",
        "index", "finish_reason", "native_finish_reason", "message", "delta", "role", "content", "usage",
        "prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
        "prompt_tokens_details", "completion_tokens_details", "cached_tokens", "reasoning_tokens", "cost",
        "error", "response", "output", "type", "x_groq", "tool_calls", "reasoning",
    ]
) | st.text(max_size=8)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["stop", "length", "error", "", "\x00", "chat.completion", "1e999", "NaN", "-1"])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(KEYS, children, max_size=6),
    max_leaves=40,
)
JSON_OBJECTS = st.dictionaries(KEYS, JSON_VALUES, max_size=8)


def new_record() -> CompletionRecord:
    return CompletionRecord(
        "req", datetime(2025, 1, 1, tzinfo=UTC), "POST", "/v1/chat/completions", "http://u"
    )


def assert_storable(record: CompletionRecord) -> None:
    """Every column within what both databases accept, and the row encodable for the spool."""
    for name in TOKEN_COLUMNS:
        value = getattr(record, name)
        assert value is None or (type(value) is int and 0 <= value < 2**62), (name, value)
    for name in TEXT_COLUMNS:
        value = getattr(record, name)
        if name == "error" and value is not None:
            # parsing keeps up to RAW_ERROR_CHARS (room to scrub a key across the cut); the stored text is
            # what finish_error() makes of it, as materialize() does
            assert isinstance(value, str)
            assert len(value) <= RAW_ERROR_CHARS, len(value)
            value = finish_error(value, ())
        assert value is None or (isinstance(value, str) and "\x00" not in value and len(value) <= MAX_ERROR_CHARS), name
    assert record.cost is None or (isinstance(record.cost, Decimal) and 0 <= record.cost < 10**12)
    assert len(record.choices) <= 128
    for choice in record.choices:
        assert 0 <= choice.index < 2**31
        for value in (choice.finish_reason, choice.native_finish_reason, choice.role):
            assert value is None or (isinstance(value, str) and "\x00" not in value)
    if record.usage is not None:
        assert isinstance(record.usage, dict)
        assert len(orjson.dumps(record.usage)) <= 64 * 1024
    row = record_to_row(record)
    assert orjson.loads(encode_row(row))["request_id"] == "req"


# ---- SSE decoder ----------------------------------------------------------------------------------

SSE_BYTES = st.lists(
    st.sampled_from([b"data: ", b"data:", b"event: x", b"id: 1", b": c", b"\n", b"\r", b"\r\n", b"{}", b"x"])
    | st.binary(max_size=30),
    max_size=60,
).map(b"".join)


def decode(chunks: list[bytes], max_event_bytes: int) -> list[tuple[bytes, bytes, int, int]]:
    decoder = SSEDecoder(max_event_bytes=max_event_bytes)
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
        assert decoder.pending_bytes <= 2 * max_event_bytes + 2
    events += decoder.close()
    return [(e.event, e.data, e.start, e.end) for e in events]


@FUZZ
@given(data=SSE_BYTES, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_sse_decoder_is_split_invariant_and_bounded(data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    whole = decode([data], 64)
    assert decode(chunks, 64) == whole
    offset = 0
    for _, payload, start, end in whole:
        assert len(payload) <= 64
        assert offset <= start <= end <= len(data)
        offset = end


def test_sse_decoder_memory_on_an_endless_line() -> None:
    decoder = SSEDecoder(max_event_bytes=64 * 1024)
    piece = b"data: " + b"x" * (1 << 20)
    tracemalloc.start()
    try:
        for _ in range(16):  # 16 MiB of one line that never ends
            assert decoder.feed(piece) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * (1 << 20), peak
    assert decoder.pending_bytes <= 2 * 64 * 1024 + 2


# ---- completion parser ------------------------------------------------------------------------------


@FUZZ
@given(obj=JSON_OBJECTS | JSON_VALUES)
def test_parse_completion_body_any_json(obj: Any) -> None:
    record = new_record()
    parse_completion_body(record, orjson.dumps(obj))
    assert_storable(record)


@FUZZ
@given(body=st.binary(max_size=200))
def test_parse_completion_body_any_bytes(body: bytes) -> None:
    record = new_record()
    assert parse_completion_body(record, body) in (True, False)
    assert_storable(record)


EVENTS = st.lists(
    JSON_OBJECTS.map(orjson.dumps) | st.binary(max_size=40) | st.just(b"[DONE]"),
    max_size=12,
)


@FUZZ
@given(events=EVENTS, at_eof=st.booleans())
def test_stream_folder_any_events(events: list[bytes], at_eof: bool) -> None:
    record = new_record()
    folder = StreamFolder(record)
    for event in events:
        carries, usage_only = folder.feed(event)
        assert isinstance(carries, bool)
        assert isinstance(usage_only, bool)
    folder.finish(at_eof=at_eof)
    assert_storable(record)


def test_stream_folder_bounds_the_choices_a_stream_can_name() -> None:
    record = new_record()
    folder = StreamFolder(record)
    for index in range(10_000):
        folder.feed(orjson.dumps({"choices": [{"index": index, "delta": {"content": "x"}}]}))
    folder.feed(orjson.dumps({"choices": [{"index": 2**40, "finish_reason": "stop"}]}))
    folder.finish()
    assert len(record.choices) == 128
    assert_storable(record)


# ---- request facts ----------------------------------------------------------------------------------


@FUZZ
@given(
    obj=JSON_OBJECTS,
    stream=st.sampled_from([True, False, None, "true", 1]),
    spaces=st.sampled_from(["", " ", "\n"]),
)
def test_inspect_request_injection_keeps_the_clients_json(
    obj: dict[str, Any], stream: Any, spaces: str
) -> None:
    obj = {**obj, "stream": stream}
    body = orjson.dumps(obj) + spaces.encode()
    facts = inspect_request(body, inject_usage=True)
    assert facts.stream is (stream is True)
    if not facts.usage_injected:
        assert facts.body == body
        return
    sent = orjson.loads(facts.body)
    options = obj.get("stream_options")
    expected = {**obj, "stream_options": {**(options or {}), "include_usage": True}}
    assert sent == expected
    assert facts.model is None or (facts.model == obj.get("model") and "\x00" not in facts.model)


@FUZZ
@given(body=st.binary(max_size=300))
def test_inspect_request_any_bytes(body: bytes) -> None:
    facts = inspect_request(body, inject_usage=True)
    if facts.usage_injected:
        orjson.loads(facts.body)  # injection only ever produces valid JSON
    else:
        assert facts.body == body


# ---- stream tap -------------------------------------------------------------------------------------


@FUZZ
@given(
    events=st.lists(JSON_OBJECTS.map(orjson.dumps) | st.binary(max_size=20), max_size=8),
    usage=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=10),
    strip=st.booleans(),
)
@example(events=[b"{}", b'{"provider":"0"}'], usage=True, cuts=[], strip=True)  # a provider only mid-stream
def test_stream_tap_passes_bytes_on(events: list[bytes], usage: bool, cuts: list[int], strip: bool) -> None:
    body = b"".join(b"data: " + e.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n\n" for e in events)
    if usage:
        body += b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    body += b"data: [DONE]\n\n"
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    record = new_record()
    tap = StreamTap(record, None, strip_usage_chunk=strip)
    out = b"".join(tap.feed(chunk, 0.0) for chunk in chunks) + tap.close(1.0)
    assert_storable(record)
    strip_only = StreamTap(new_record(), None, strip_usage_chunk=strip, strip_only=True)
    assert b"".join(strip_only.feed(chunk, 0.0) for chunk in chunks) + strip_only.close(1.0) == out
    if not strip:
        assert out == body
        return
    remaining = iter(body)  # the client gets a subsequence: only whole events are ever dropped
    assert all(byte in remaining for byte in out)
    if usage and record.provider is None and not any(e.startswith(b"[DONE]") for e in events):
        assert b'"usage":{"prompt_tokens":1' not in out
        assert record.prompt_tokens == 1


# ---- a whole captured stream folded at once (the writer's feed_all) ----------------------------------

_CHUNK_BASE = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
_CONTENT = st.text(max_size=6) | st.sampled_from(['"', "\\", '\\"', "\n", '"},"finish_reason":"stop"', "\r"])
# the deltas' shape, but bare quotes in the "content" make it a finish and usage
_DISGUISED = (
    b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    b'"delta":{"content":"a"},"finish_reason":"length"}],"usage":{"prompt_tokens":9},"x":[{"delta":{"content":'
    b'"b"},"finish_reason":null}]}\n\n'
)
# OpenAI's random padding, raw: emptied, it would leave a usage object behind (the last "usage" key wins)
_DISGUISED_BY_OBFUSCATION = (
    b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    b'"delta":{"content":"a"},"finish_reason":null}],"obfuscation":"q","usage":{"prompt_tokens":9},"z":"r"}\n\n'
)
_OBFUSCATIONS = st.text(max_size=12) | st.sampled_from(['"', "\\", '","usage":{"prompt_tokens":9},"z":"', "\n"])
_ODD_BLOCKS = st.sampled_from(
    [
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"b"},"finish_reason":null}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6}}\n\n',
        b'data: {"error":{"message":"overloaded"}}\n\n',
        b"data: [DONE]\n\n",
        b": keep-alive\n\n",
        b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n',
        b'data: {"id":"chatcmpl-x","choices":[{"index":0,"delta":{"content":"y"}, "finish_reason": "length"}]}\n\n',
        b"\n",
        b"data: {not json\n\n",
        _DISGUISED,
        _DISGUISED_BY_OBFUSCATION,
    ]
)


def _delta_block(content: str, spaced: bool, obfuscation: str | None = None) -> bytes:
    chunk: dict[str, object] = {
        **_CHUNK_BASE, "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    }
    if obfuscation is not None:
        chunk["obfuscation"] = obfuscation
    data = orjson.dumps(chunk)
    return b"data: " + (data.replace(b",", b", ") if spaced else data) + b"\n\n"


@FUZZ
@given(
    contents=st.lists(_CONTENT, min_size=1, max_size=20),
    copies=st.integers(min_value=0, max_value=120),
    odd=st.lists(st.tuples(st.integers(min_value=0, max_value=200), _ODD_BLOCKS), max_size=3),
    spaced=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=60_000), min_size=1, max_size=12),
    obfuscations=st.none() | st.lists(_OBFUSCATIONS, min_size=1, max_size=20),
)
@example(contents=["x"], copies=60, odd=[(20, _DISGUISED)], spaced=False, cuts=[300], obfuscations=None)
@example(contents=["x"], copies=60, odd=[(20, _DISGUISED_BY_OBFUSCATION)], spaced=False, cuts=[300],
         obfuscations=["Qm", "k", ""])  # fmt: skip
def test_feed_all_equals_read_by_read(
    contents: list[str],
    copies: int,
    odd: list[tuple[int, bytes]],
    spaced: bool,
    cuts: list[int],
    obfuscations: list[str] | None,
) -> None:
    """feed_all skips the middle of a settled stream when it can prove that part changes nothing: for
    long streams of same-shape deltas with hostile content and stray events anywhere, the record must
    be the one a read-by-read fold gives."""
    first = {**_CHUNK_BASE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"},
                                         "finish_reason": None}]}  # fmt: skip
    blocks = [b"data: " + orjson.dumps(first) + b"\n\n"]
    padding = [None] if obfuscations is None else obfuscations  # OpenAI's "obfuscation" strings, or none
    blocks += [_delta_block(contents[n % len(contents)], spaced, padding[n % len(padding)]) for n in range(copies)]
    for at, block in odd:
        blocks.insert(min(at, len(blocks)), block)
    blocks.append(_delta_block("", spaced)[:-2].replace(b'"finish_reason":null', b'"finish_reason":"stop"') + b"\n\n")
    blocks.append(b"data: [DONE]\n\n")
    body = b"".join(blocks)
    points = sorted({c % (len(body) + 1) for c in cuts})
    reads = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    times = [float(n) for n in range(1, len(reads) + 1)]
    whole, each = new_record(), new_record()
    whole_tap = StreamTap(whole, None, strip_usage_chunk=False)
    each_tap = StreamTap(each, None, strip_usage_chunk=False)
    whole_tap.feed_all(reads, times)
    for read, at in zip(reads, times, strict=True):
        each_tap.feed(read, at)
    whole_tap.close(99.0)
    each_tap.close(99.0)
    assert record_to_row(whole) == record_to_row(each)
    assert whole_tap.folder.failed == each_tap.folder.failed
    assert whole_tap.first_event_at == each_tap.first_event_at
    assert whole_tap.first_content_at == each_tap.first_content_at


_USUAL_HEADER_NAMES = [
    *("host", "content-length", "connection", "keep-alive", "transfer-encoding", "authorization", "accept"),
    *("content-type", "user-agent", "x-stainless-lang", "openai-organization", "x-ledger-tags", "x-ledger-user"),
]
_RARE_HEADER_NAMES = sorted((HOP_BY_HOP | STEERING_HEADERS | {"forwarded", "x-ledger-x"}) - set(_USUAL_HEADER_NAMES))
_HEADER_VALUES = st.sampled_from(
    [
        *("keep-alive", "close", "Keep-Alive", "keep-alive, Upgrade", "close, X-Stainless-Lang", " , "),
        *("for=1.2.3.4", "for=1.2.3.4;host=evil", "Bearer sk-x", "chunked", "x"),
    ]
)


def _header_pairs(names: list[str], max_size: int) -> st.SearchStrategy[list[tuple[str, str]]]:
    """Lists of every length up to max_size alike (hypothesis would favour short ones)."""
    cased = st.sampled_from(names).flatmap(lambda name: st.sampled_from([name, name.upper(), name.title()]))
    pair = st.tuples(cased, _HEADER_VALUES)
    return st.integers(0, max_size).flatmap(lambda size: st.lists(pair, min_size=size, max_size=size))


# mostly usual headers, so that the fast paths (FEW_HEADERS or more, none unusual) are taken often
_HEADERS = st.tuples(_header_pairs(_USUAL_HEADER_NAMES, 24), _header_pairs(_RARE_HEADER_NAMES, 2)).flatmap(
    lambda parts: st.permutations(parts[0] + parts[1])
)


@FUZZ
@given(_HEADERS)
@example([("Connection", "close, X-Stainless-Lang"), ("X-Stainless-Lang", "x")] + [("Accept", "x")] * 8)
def test_header_fast_paths_forward_what_the_per_header_filters_forward(pairs: list[tuple[str, str]]) -> None:
    """The fast paths (a copy and a few removals when no unusual header is present) must give exactly
    what the one-header-at-a-time filters give, order and case included, for any mix of headers."""
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    fast, fast_reason = forwardable_request_headers(headers)
    slow, slow_reason = filter_request_headers(headers)
    assert fast_reason == slow_reason
    if slow_reason is None:
        assert list(fast.items()) == list(slow.items())
    assert list(forwardable_response_headers(headers).items()) == list(filter_response_headers(headers).items())
