"""Pure parsing of non-streaming bodies: parse_completion_body, apply_usage and error_text.

No sockets, no database. Expected values are read from the fixture payloads, so each assertion
checks a mapping rule of wire-formats.md rather than a number copied from output.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest
from multidict import CIMultiDict
from openrouter import OpenRouter
from openrouter.errors import OpenRouterError
from openrouter.utils import RetryConfig
from sqlalchemy import text

from proxy.credentials import bearer_key, key_fingerprint
from proxy.parse.chat_json import parse_completion_body
from proxy.parse.fields import MAX_TEXT_CHARS, MAX_TOKEN_COUNT, RAW_ERROR_CHARS, error_text
from proxy.parse.record import CompletionRecord
from proxy.parse.request import MAX_TAG_CHARS, MAX_TAGS, MAX_USER_CHARS, header_user, inspect_request, parse_tags
from proxy.parse.usage import MAX_USAGE_JSON_BYTES, apply_usage
from proxy.store.models import choices_table, completions_table

from .conftest import Ledger
from .payloads import (
    DEEPSEEK_REASONER,
    GROQ_X_GROQ_USAGE,
    HTML_502,
    MODELS_LIST,
    OPENAI_BASIC,
    OPENAI_ERROR_401,
    OPENAI_ERROR_429,
    OPENAI_ERROR_429_QUOTA,
    OPENAI_N2,
    OPENAI_TOOL_CALLS,
    OPENROUTER_CHOICE_ERROR,
    OPENROUTER_ERROR_401,
    OPENROUTER_ERROR_429,
    OPENROUTER_WITH_COST,
)
from .upstream import FakeUpstream, json_reply

TOKEN_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


def new_record() -> CompletionRecord:
    return CompletionRecord(
        request_id="00000000-0000-4000-8000-000000000000",
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        method="POST",
        path="/v1/chat/completions",
        upstream="http://upstream",
    )


def parsed(payload: Any) -> tuple[bool, CompletionRecord]:
    record = new_record()
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return parse_completion_body(record, body), record


def usage_record(usage: dict[str, Any]) -> CompletionRecord:
    record = new_record()
    apply_usage(record, usage)
    return record


def tokens(record: CompletionRecord) -> dict[str, int | None]:
    return {name: getattr(record, name) for name in TOKEN_COLUMNS}


# --- whole bodies -------------------------------------------------------------------------------


def test_openai_basic_fills_identity_usage_and_choice() -> None:
    ok, record = parsed(OPENAI_BASIC)
    usage = OPENAI_BASIC["usage"]
    assert ok
    assert record.completion_id == OPENAI_BASIC["id"]
    assert record.object == "chat.completion"
    assert record.created == OPENAI_BASIC["created"]
    assert record.model == OPENAI_BASIC["model"]
    assert record.provider is None
    assert record.system_fingerprint == OPENAI_BASIC["system_fingerprint"]
    assert record.service_tier == OPENAI_BASIC["service_tier"]
    assert tokens(record) == {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
        "cache_write_tokens": None,
        "reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"],
    }
    assert record.cost is None
    assert record.cost_source is None
    assert record.usage == usage
    assert record.error is None
    assert [(c.index, c.finish_reason, c.native_finish_reason, c.role) for c in record.choices] == [
        (0, "stop", None, "assistant")
    ]


def test_tool_calls_body() -> None:
    ok, record = parsed(OPENAI_TOOL_CALLS)
    assert ok
    assert [(c.index, c.finish_reason, c.role) for c in record.choices] == [(0, "tool_calls", "assistant")]
    assert record.service_tier is None
    assert record.cached_tokens is None
    assert record.reasoning_tokens is None
    assert record.total_tokens == OPENAI_TOOL_CALLS["usage"]["total_tokens"]


def test_n2_gives_one_choice_per_index_and_one_usage() -> None:
    ok, record = parsed(OPENAI_N2)
    assert ok
    assert [(c.index, c.finish_reason) for c in record.choices] == [
        (choice["index"], choice["finish_reason"]) for choice in OPENAI_N2["choices"]
    ]
    assert record.completion_tokens == OPENAI_N2["usage"]["completion_tokens"]


def test_choices_out_of_order_keep_their_own_index() -> None:
    body = copy.deepcopy(OPENAI_N2)
    body["choices"].reverse()
    _, record = parsed(body)
    assert sorted((c.index, c.finish_reason) for c in record.choices) == [(0, "stop"), (1, "length")]


def test_openrouter_cost_is_exact_decimal_with_every_token_kind() -> None:
    ok, record = parsed(OPENROUTER_WITH_COST)
    usage = OPENROUTER_WITH_COST["usage"]
    assert ok
    assert record.provider == OPENROUTER_WITH_COST["provider"]
    assert record.cost == Decimal(str(usage["cost"]))
    assert isinstance(record.cost, Decimal)
    assert record.cost_source == "upstream"
    assert record.cached_tokens == usage["prompt_tokens_details"]["cached_tokens"]
    assert record.cache_write_tokens == usage["prompt_tokens_details"]["cache_write_tokens"]
    assert record.reasoning_tokens == usage["completion_tokens_details"]["reasoning_tokens"]
    assert record.system_fingerprint is None  # JSON null stays NULL
    assert [(c.finish_reason, c.native_finish_reason) for c in record.choices] == [("stop", "end_turn")]


def test_openrouter_200_with_choice_error_records_the_message() -> None:
    ok, record = parsed(OPENROUTER_CHOICE_ERROR)
    assert ok
    assert record.error == OPENROUTER_CHOICE_ERROR["choices"][0]["error"]["message"]
    assert record.choices[0].finish_reason == "error"
    # usage.cost 0 is a known cost of zero, not an unknown one
    assert record.cost == Decimal(0)
    assert record.cost_source == "upstream"


def test_deepseek_cache_hit_tokens_when_details_are_null() -> None:
    _, record = parsed(DEEPSEEK_REASONER)
    usage = DEEPSEEK_REASONER["usage"]
    assert record.cached_tokens == usage["prompt_cache_hit_tokens"]  # 0 is a real count, not unknown
    assert record.cached_tokens == 0
    assert record.reasoning_tokens == usage["completion_tokens_details"]["reasoning_tokens"]
    assert record.completion_id == DEEPSEEK_REASONER["id"]


def test_groq_usage_under_x_groq() -> None:
    _, record = parsed(GROQ_X_GROQ_USAGE)
    usage = GROQ_X_GROQ_USAGE["x_groq"]["usage"]
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
    )
    assert record.usage == usage
    assert record.service_tier == "on_demand"


def test_top_level_usage_wins_over_x_groq() -> None:
    body = dict(GROQ_X_GROQ_USAGE, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    _, record = parsed(body)
    assert (record.prompt_tokens, record.total_tokens) == (1, 3)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (OPENAI_ERROR_401, OPENAI_ERROR_401["error"]["message"]),
        (OPENROUTER_ERROR_429, OPENROUTER_ERROR_429["error"]["message"]),
        ({"error": "Unauthorized"}, "Unauthorized"),
        ({"detail": "x", "error": {"code": 500}}, '{"code":500}'),
    ],
)
def test_error_envelopes(payload: dict[str, Any], message: str) -> None:
    ok, record = parsed(payload)
    assert ok
    assert record.error == message
    assert record.choices == []
    assert tokens(record) == dict.fromkeys(TOKEN_COLUMNS)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html><body>502 Bad Gateway</body></html>",
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b'{"truncated": ',
        b"\xff\xfe not utf-8",
    ],
)
def test_non_object_bodies_are_not_parsed(body: bytes) -> None:
    ok, record = parsed(body)
    assert not ok
    assert record.completion_id is None
    assert record.choices == []


@pytest.mark.parametrize(
    "payload",
    [
        MODELS_LIST,
        {},
        {"id": "abc", "status": "queued"},
        {"object": "embedding", "data": []},
    ],
)
def test_json_objects_that_are_not_completions_are_not_parsed(payload: dict[str, Any]) -> None:
    ok, _ = parsed(payload)
    assert not ok


def test_a_completion_without_usage_is_still_a_completion() -> None:
    body = {k: v for k, v in OPENAI_BASIC.items() if k != "usage"}
    ok, record = parsed(body)
    assert ok
    assert tokens(record) == dict.fromkeys(TOKEN_COLUMNS)
    assert record.usage is None
    assert record.cost is None


# --- wrong types: left NULL, never guessed ----------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["12", -1, True, False, None, 1.5, [], {}, float("nan"), MAX_TOKEN_COUNT, "", "1e3"],
    ids=repr,
)
def test_bad_token_counts_are_null(bad: Any) -> None:
    usage = {
        "prompt_tokens": bad,
        "completion_tokens": bad,
        "total_tokens": bad,
        "prompt_tokens_details": {"cached_tokens": bad, "cache_write_tokens": bad},
        "completion_tokens_details": {"reasoning_tokens": bad},
    }
    record = usage_record(usage)
    assert tokens(record) == dict.fromkeys(TOKEN_COLUMNS)


def test_integral_floats_are_counts() -> None:
    record = usage_record({"prompt_tokens": 12.0, "completion_tokens": 3, "total_tokens": 15.0})
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (12, 3, 15)
    assert isinstance(record.prompt_tokens, int)


def test_total_is_derived_only_from_two_known_counts() -> None:
    assert usage_record({"prompt_tokens": 7, "completion_tokens": 5}).total_tokens == 12
    assert usage_record({"prompt_tokens": 7}).total_tokens is None
    assert usage_record({"prompt_tokens": 7, "completion_tokens": "5"}).total_tokens is None


def test_one_bad_field_does_not_spoil_the_others() -> None:
    record = usage_record({"prompt_tokens": "many", "completion_tokens": 4, "total_tokens": 10})
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (None, 4, 10)


@pytest.mark.parametrize("details", [None, "x", [], 5])
def test_detail_objects_of_the_wrong_type_are_ignored(details: Any) -> None:
    record = usage_record(
        {
            "prompt_tokens": 3,
            "prompt_tokens_details": details,
            "completion_tokens_details": details,
            "input_tokens_details": details,
            "output_tokens_details": details,
        }
    )
    assert (record.cached_tokens, record.cache_write_tokens, record.reasoning_tokens) == (None, None, None)
    assert record.prompt_tokens == 3


def test_cached_token_sources_in_order() -> None:
    assert (
        usage_record(
            {"prompt_tokens_details": {"cached_tokens": 5}, "prompt_cache_hit_tokens": 9}
        ).cached_tokens
        == 5
    )
    assert (
        usage_record(
            {"prompt_tokens_details": {"cached_tokens": None}, "prompt_cache_hit_tokens": 9}
        ).cached_tokens
        == 9
    )
    assert usage_record({"input_tokens_details": {"cached_tokens": 4}}).cached_tokens == 4
    assert usage_record({"cache_read_input_tokens": 6}).cached_tokens == 6
    assert usage_record({"prompt_cache_miss_tokens": 6}).cached_tokens is None


def test_an_unusable_first_source_falls_through_to_the_next() -> None:
    record = usage_record(
        {
            "prompt_tokens": "x",
            "input_tokens": 5,
            "completion_tokens": None,
            "output_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": "x", "cache_write_tokens": -1},
            "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 2},
            "completion_tokens_details": {"reasoning_tokens": 1.5},
            "output_tokens_details": {"reasoning_tokens": 4},
            "cache_read_input_tokens": 99,
            "cache_creation_input_tokens": 98,
        }
    )
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (5, 7, 12)
    assert (record.cached_tokens, record.cache_write_tokens, record.reasoning_tokens) == (3, 2, 4)
    other_shapes = usage_record(
        {
            "prompt_tokens_details": None,
            "input_tokens_details": {"cached_tokens": 3},
            "completion_tokens_details": [],
            "output_tokens_details": {"reasoning_tokens": 4},
        }
    )
    assert (other_shapes.cached_tokens, other_shapes.reasoning_tokens) == (3, 4)


def test_cache_write_token_sources() -> None:
    assert usage_record({"prompt_tokens_details": {"cache_write_tokens": 100}}).cache_write_tokens == 100
    assert usage_record({"input_tokens_details": {"cache_write_tokens": 0}}).cache_write_tokens == 0
    assert usage_record({"cache_creation_input_tokens": 8}).cache_write_tokens == 8


def test_reasoning_token_sources() -> None:
    assert usage_record({"completion_tokens_details": {"reasoning_tokens": 40}}).reasoning_tokens == 40
    assert usage_record({"output_tokens_details": {"reasoning_tokens": 64}}).reasoning_tokens == 64


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0.0087495, Decimal("0.0087495")),
        (0, Decimal(0)),
        ("0.25", Decimal("0.25")),
        (1e-12, Decimal("1E-12")),
        (12, Decimal(12)),
    ],
)
def test_cost_is_exact(raw: Any, expected: Decimal) -> None:
    record = usage_record({"cost": raw})
    assert record.cost == expected
    assert record.cost_source == "upstream"


@pytest.mark.parametrize("raw", [None, -0.5, "free", True, float("inf"), float("nan"), [], {"usd": 1}, 1e13])
def test_unknown_or_bad_cost_is_null_never_zero(raw: Any) -> None:
    record = usage_record({"prompt_tokens": 3, "cost": raw})
    assert record.cost is None
    assert record.cost_source is None


def test_missing_cost_is_null() -> None:
    record = usage_record({"prompt_tokens": 3, "completion_tokens": 1})
    assert record.cost is None
    assert record.cost_source is None


def test_huge_usage_object_is_not_stored_whole() -> None:
    usage = {"prompt_tokens": 1, "padding": "x" * (MAX_USAGE_JSON_BYTES + 1)}
    record = usage_record(usage)
    assert record.usage == {"truncated": True}
    assert record.prompt_tokens == 1


@pytest.mark.parametrize(
    "choices", [None, "x", 3, [None, "x", 5], [{"index": "0", "finish_reason": "stop"}], [{"index": -1}]]
)
def test_bad_choices_give_no_choice_rows(choices: Any) -> None:
    ok, record = parsed(dict(OPENAI_BASIC, choices=choices))
    assert ok  # still a completion: it has an id, object and usage
    assert record.choices == []
    assert record.prompt_tokens == OPENAI_BASIC["usage"]["prompt_tokens"]


def test_choice_without_index_takes_its_position() -> None:
    body = dict(
        OPENAI_N2, choices=[{k: v for k, v in c.items() if k != "index"} for c in OPENAI_N2["choices"]]
    )
    _, record = parsed(body)
    assert [(c.index, c.finish_reason) for c in record.choices] == [(0, "stop"), (1, "length")]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", 123),
        ("model", ["gpt"]),
        ("object", None),
        ("created", "yesterday"),
        ("created", -5),
        ("created", True),
        ("provider", {"name": "x"}),
        ("system_fingerprint", ""),
        ("service_tier", 1),
    ],
)
def test_identity_fields_of_the_wrong_type_are_null(field: str, value: Any) -> None:
    _, record = parsed(dict(OPENROUTER_WITH_COST, **{field: value}))
    column = "completion_id" if field == "id" else field
    assert getattr(record, column) is None


def test_text_fields_drop_nul_characters() -> None:
    _, record = parsed(dict(OPENAI_BASIC, model="gpt\u00004o", id="chatcmpl-\u0000x"))
    assert record.model == "gpt4o"
    assert record.completion_id == "chatcmpl-x"


def test_text_fields_are_cut_at_max_text_chars() -> None:
    whole, cut = "m" * MAX_TEXT_CHARS, "n" * (MAX_TEXT_CHARS + 1)
    _, record = parsed(dict(OPENAI_BASIC, model=whole, id=cut, system_fingerprint="é" * (MAX_TEXT_CHARS + 5)))
    assert record.model == whole
    assert record.completion_id == cut[:MAX_TEXT_CHARS]
    assert record.system_fingerprint == "é" * MAX_TEXT_CHARS


# --- error_text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"message": "Rate limited", "code": 429}, "Rate limited"),
        ("  plain string  ", "plain string"),
        ({"code": 502}, '{"code":502}'),
        ({"message": "", "code": "x"}, '{"message":"","code":"x"}'),
        (None, None),
        (False, None),
        ("", None),
        ("   ", None),
        (502, "502"),
        ("bad\u0000byte", "badbyte"),
    ],
)
def test_error_text(value: Any, expected: str | None) -> None:
    assert error_text(value) == expected


def test_error_text_is_capped() -> None:
    # cut to MAX_ERROR_CHARS only once credentials are scrubbed (parse.capture.finish_error)
    assert error_text("e" * (RAW_ERROR_CHARS * 3)) == "e" * RAW_ERROR_CHARS


# --- request facts ------------------------------------------------------------------------------


def test_key_fingerprint_is_a_sha256_prefix() -> None:
    key = "sk-or-v1-0123456789abcdef"
    assert key_fingerprint(key) == hashlib.sha256(key.encode()).hexdigest()[:16]
    assert key_fingerprint(key) != key_fingerprint(key + "x")


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"Authorization": "Bearer sk-1"}, "sk-1"),
        ({"Authorization": "bearer   sk-2  "}, "sk-2"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer "}, None),
        ({"api-key": "azure-key"}, "azure-key"),
        ({"x-api-key": "anthropic-key"}, "anthropic-key"),
        ({}, None),
    ],
)
def test_bearer_key(headers: dict[str, str], key: str | None) -> None:
    assert bearer_key(CIMultiDict(headers)) == key


def test_tags_are_parsed_and_capped() -> None:
    assert parse_tags(["team=search, env = prod,flag,=nokey,,"]) == {
        "team": "search",
        "env": "prod",
        "flag": "",
    }
    assert parse_tags(["a=1", "b=2,a=3"]) == {"a": "3", "b": "2"}  # several headers merge, last value wins
    assert parse_tags(["", " , "]) is None
    many = ",".join(f"k{n}=v{n}" for n in range(MAX_TAGS + 4))
    tags = parse_tags([many])
    assert tags == {f"k{n}": f"v{n}" for n in range(MAX_TAGS)}
    long_pair = "k=" + "v" * (MAX_TAG_CHARS - 2)  # exactly 128 characters: kept
    assert parse_tags([long_pair + ",ok=1"]) == {"k": "v" * (MAX_TAG_CHARS - 2), "ok": "1"}
    assert parse_tags([long_pair + "v,ok=1"]) == {"ok": "1"}  # a pair over 128 characters is dropped


def test_request_facts_from_the_body() -> None:
    body = orjson.dumps({"model": "gpt-4o", "user": "u\u00001", "messages": []})
    facts = inspect_request(body, inject_usage=True)
    assert (facts.model, facts.stream, facts.user, facts.body) == ("gpt-4o", False, "u1", body)
    for bad in (b"", b"not json", b"[]", orjson.dumps({"model": 5, "user": ["x"], "stream": "yes"})):
        facts = inspect_request(bad, inject_usage=True)
        assert (facts.model, facts.stream, facts.user, facts.body) == (None, False, None, bad)
    long_user = inspect_request(orjson.dumps({"user": "u" * 1000}), inject_usage=False).user
    assert long_user == "u" * MAX_USER_CHARS


def test_header_user_has_the_body_users_limits() -> None:
    assert header_user(None) is None
    assert header_user("") is None
    assert header_user("  alice ") == "alice"
    assert header_user("u" * 1000) == "u" * MAX_USER_CHARS


# --- through the proxy: realistic bodies with the official clients, every column of the row -------------

KEY = "sk-test-4f9a8b7c6d5e4f3a2b1c"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()[:16]
ROW_COLUMNS = {c.name for c in completions_table.columns} | {"choices"}
CHOICE_COLUMNS = {c.name for c in choices_table.columns}


@dataclass
class Exchange:
    """What the client saw: status, headers, the body bytes, and the time window of the call."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    before: datetime
    after: datetime


def usage_columns(usage: dict[str, Any] | None) -> dict[str, Any]:
    """The token and cost columns an OpenAI/OpenRouter usage object maps to (wire-formats.md section 4)."""
    if usage is None:
        return dict.fromkeys((*TOKEN_COLUMNS, "cost", "cost_source", "usage"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    cost = usage.get("cost")
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "cached_tokens": prompt_details.get("cached_tokens"),
        "cache_write_tokens": prompt_details.get("cache_write_tokens"),
        "reasoning_tokens": completion_details.get("reasoning_tokens"),
        "cost": None if cost is None else Decimal(str(cost)),
        "cost_source": None if cost is None else "upstream",
        "usage": usage,
    }


def completion_columns(payload: dict[str, Any]) -> dict[str, Any]:
    """Identity, usage and choice columns expected from a completion body."""
    return {
        "completion_id": payload["id"],
        "object": payload["object"],
        "created": payload["created"],
        "model": payload["model"],
        "provider": payload.get("provider"),
        "system_fingerprint": payload.get("system_fingerprint"),
        "service_tier": payload.get("service_tier"),
        **usage_columns(payload.get("usage")),
        "choices": [
            {
                "index": choice["index"],
                "finish_reason": choice["finish_reason"],
                "native_finish_reason": choice.get("native_finish_reason"),
                "role": choice["message"]["role"],
            }
            for choice in payload["choices"]
        ],
    }


def empty_completion_columns() -> dict[str, Any]:
    names = ("completion_id", "object", "created", "model", "provider", "system_fingerprint", "service_tier")
    return {**dict.fromkeys(names), **usage_columns(None), "choices": []}


def assert_row(row: dict[str, Any], exchange: Exchange, expected: dict[str, Any]) -> None:
    """Every column: the timing and identity columns checked here, all others equal to `expected`."""
    assert set(row) == ROW_COLUMNS
    assert set(expected) | {"id", "request_id", "started_at", "started_hour", "duration_ms", "ttft_ms"} == ROW_COLUMNS
    assert isinstance(row["id"], int)
    assert row["request_id"] == exchange.headers["X-Ledger-Request-Id"]
    request_uuid = uuid.UUID(row["request_id"])
    assert request_uuid.version == 7
    started_at = row["started_at"]
    assert started_at.utcoffset() == timedelta(0)
    assert exchange.before <= started_at <= exchange.after
    assert row["started_hour"] == int(started_at.timestamp()) // 3600
    id_time = datetime.fromtimestamp((request_uuid.int >> 80) / 1000, UTC)  # UUIDv7: milliseconds first
    assert exchange.before - timedelta(milliseconds=1) <= id_time <= exchange.after
    window_ms = (exchange.after - exchange.before).total_seconds() * 1000
    assert 0 < row["duration_ms"] <= window_ms + 5
    if expected["status_code"] is None:
        assert row["ttft_ms"] is None
    else:
        assert 0 < row["ttft_ms"] <= row["duration_ms"]
    for choice in row["choices"]:
        assert set(choice) == CHOICE_COLUMNS
        assert choice.pop("completion_pk") == row["id"]
        assert isinstance(choice.pop("id"), int)
    actual = {name: row[name] for name in expected}
    assert actual == expected
    if actual["cost"] is not None:
        assert isinstance(actual["cost"], Decimal)


def base_columns(ledger: Ledger, path: str, **columns: Any) -> dict[str, Any]:
    return {
        "method": "POST",
        "path": path,
        "upstream": ledger.config.upstream.url,
        "status_code": 200,
        "outcome": "ok",
        "stream": False,
        "requested_model": None,
        "api_key_hash": KEY_HASH,
        "user": None,
        "tags": None,
        "error": None,
        "upstream_request_id": None,
        "api": "chat",
        **columns,
    }


def openai_client(ledger: Ledger, scenario: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=ledger.url + "/v1",
        api_key=KEY,
        max_retries=0,
        default_headers={"X-Fake-Scenario": scenario, **headers},
    )


async def openai_call(
    ledger: Ledger, scenario: str, headers: dict[str, str] | None = None, **create: Any
) -> tuple[Exchange, Any]:
    """Call chat.completions.create through the proxy; returns what came back and the parsed result
    (a ChatCompletion, or the APIStatusError raised)."""
    create.setdefault("messages", [{"role": "user", "content": "Why is the sky blue?"}])
    async with openai_client(ledger, scenario, **(headers or {})) as client:
        before = datetime.now(UTC)
        try:
            raw = await client.chat.completions.with_raw_response.create(**create)
        except openai.APIStatusError as exc:
            after = datetime.now(UTC)
            return Exchange(exc.status_code, exc.response.headers, exc.response.content, before, after), exc
        after = datetime.now(UTC)
        return Exchange(raw.status_code, raw.headers, raw.content, before, after), raw.parse()


async def openrouter_call(
    ledger: Ledger, scenario: str, headers: dict[str, str] | None = None, **send: Any
) -> tuple[Exchange, Any]:
    """Call chat.send_async through the proxy with the OpenRouter SDK (retries off); the raw response is
    captured by an httpx event hook."""
    seen: list[httpx.Response] = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        seen.append(response)

    send.setdefault("messages", [{"role": "user", "content": "What is the capital of France?"}])
    http = httpx.AsyncClient(event_hooks={"response": [keep]})
    async with OpenRouter(
        api_key=KEY,
        server_url=ledger.url + "/api/v1",
        async_client=http,
        retry_config=RetryConfig("none", None, False),
    ) as client:  # type: ignore[arg-type]
        before = datetime.now(UTC)
        try:
            result: Any = await client.chat.send_async(
                http_headers={"X-Fake-Scenario": scenario, **(headers or {})}, **send
            )
        except OpenRouterError as exc:
            result = exc
        after = datetime.now(UTC)
    await http.aclose()
    [response] = seen
    return Exchange(response.status_code, response.headers, response.content, before, after), result


async def test_openai_plain_completion(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("plain", json_reply(OPENAI_BASIC, headers={"x-request-id": "req_plain_1"}))
    exchange, completion = await openai_call(
        ledger,
        "plain",
        {"X-Ledger-Tags": "team=search, env = prod", "X-Ledger-User": "header-user"},
        model="gpt-4o",
        user="end-user-7",
    )
    assert exchange.status == 200
    assert exchange.body == orjson.dumps(OPENAI_BASIC)
    assert completion.id == OPENAI_BASIC["id"]
    assert (
        completion.usage.prompt_tokens_details.cached_tokens
        == OPENAI_BASIC["usage"]["prompt_tokens_details"]["cached_tokens"]
    )
    assert_row(
        await ledger.row(),
        exchange,
        {
            **base_columns(
                ledger,
                "/v1/chat/completions",
                requested_model="gpt-4o",
                user="end-user-7",
                tags={"team": "search", "env": "prod"},
                upstream_request_id="req_plain_1",
            ),
            **completion_columns(OPENAI_BASIC),
        },
    )


async def test_openai_tool_calls(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("tools", json_reply(OPENAI_TOOL_CALLS))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    exchange, completion = await openai_call(
        ledger, "tools", {"X-Ledger-User": "header-user"}, model="gpt-4o-mini", tools=tools
    )
    assert exchange.body == orjson.dumps(OPENAI_TOOL_CALLS)
    assert [call.function.arguments for call in completion.choices[0].message.tool_calls] == [
        call["function"]["arguments"] for call in OPENAI_TOOL_CALLS["choices"][0]["message"]["tool_calls"]
    ]
    assert upstream.requests[0].json()["tools"] == tools
    assert_row(
        await ledger.row(),
        exchange,
        {
            **base_columns(ledger, "/v1/chat/completions", requested_model="gpt-4o-mini", user="header-user"),
            **completion_columns(OPENAI_TOOL_CALLS),
        },
    )


async def test_openai_n2_gives_two_choice_rows(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("n2", json_reply(OPENAI_N2))
    exchange, completion = await openai_call(ledger, "n2", model="gpt-4o-mini", n=2)
    assert exchange.body == orjson.dumps(OPENAI_N2)
    assert len(completion.choices) == 2
    row = await ledger.row()
    assert len(row["choices"]) == 2
    assert_row(
        row,
        exchange,
        {
            **base_columns(ledger, "/v1/chat/completions", requested_model="gpt-4o-mini"),
            **completion_columns(OPENAI_N2),
        },
    )


async def test_openrouter_with_cost(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add(
        "or", json_reply(OPENROUTER_WITH_COST, headers={"X-Generation-Id": OPENROUTER_WITH_COST["id"]})
    )
    exchange, result = await openrouter_call(
        ledger,
        "or",
        {"X-Ledger-User": "ops", "X-Ledger-Tags": "job=nightly"},
        model="anthropic/claude-sonnet-4",
    )
    assert exchange.status == 200
    assert exchange.body == orjson.dumps(OPENROUTER_WITH_COST)
    assert result.id == OPENROUTER_WITH_COST["id"]
    assert upstream.requests[0].path_qs == "/api/v1/chat/completions"
    expected = {
        **base_columns(
            ledger,
            "/api/v1/chat/completions",
            requested_model="anthropic/claude-sonnet-4",
            user="ops",
            tags={"job": "nightly"},
            upstream_request_id=OPENROUTER_WITH_COST["id"],
        ),
        **completion_columns(OPENROUTER_WITH_COST),
    }
    assert expected["cost"] == Decimal("0.0087495")
    assert (expected["provider"], expected["cache_write_tokens"], expected["reasoning_tokens"]) == (
        "Anthropic",
        100,
        40,
    )
    assert_row(await ledger.row(), exchange, expected)


async def test_openrouter_200_with_a_choice_error(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("ce", json_reply(OPENROUTER_CHOICE_ERROR))
    exchange, _ = await openrouter_call(ledger, "ce", model="meta-llama/llama-3.3-70b-instruct")
    assert exchange.body == orjson.dumps(OPENROUTER_CHOICE_ERROR)
    assert_row(
        await ledger.row(),
        exchange,
        {
            **base_columns(
                ledger,
                "/api/v1/chat/completions",
                requested_model="meta-llama/llama-3.3-70b-instruct",
                outcome="upstream_error",
                error=OPENROUTER_CHOICE_ERROR["choices"][0]["error"]["message"],
            ),
            **completion_columns(OPENROUTER_CHOICE_ERROR),
        },
    )


@pytest.mark.parametrize(
    ("payload", "status", "exception"),
    [
        (OPENAI_ERROR_401, 401, openai.AuthenticationError),
        (OPENAI_ERROR_429, 429, openai.RateLimitError),
        (OPENAI_ERROR_429_QUOTA, 429, openai.RateLimitError),
    ],
    ids=["401", "429", "429-quota"],
)
async def test_openai_error_bodies(
    ledger: Ledger, upstream: FakeUpstream, payload: dict[str, Any], status: int, exception: type[Exception]
) -> None:
    upstream.add("err", json_reply(payload, status=status, headers={"x-request-id": "req_err"}))
    exchange, error = await openai_call(ledger, "err", model="gpt-4o")
    assert isinstance(error, exception)
    assert error.code == payload["error"]["code"]
    assert exchange.status == status
    assert exchange.body == orjson.dumps(payload)
    assert_row(
        await ledger.row(),
        exchange,
        {
            **base_columns(
                ledger,
                "/v1/chat/completions",
                requested_model="gpt-4o",
                status_code=status,
                outcome="upstream_error",
                error=payload["error"]["message"],
                upstream_request_id="req_err",
            ),
            **empty_completion_columns(),
        },
    )


@pytest.mark.parametrize(
    ("payload", "status"), [(OPENROUTER_ERROR_429, 429), (OPENROUTER_ERROR_401, 401)], ids=["429", "401"]
)
async def test_openrouter_error_bodies(
    ledger: Ledger, upstream: FakeUpstream, payload: dict[str, Any], status: int
) -> None:
    upstream.add("err", json_reply(payload, status=status))
    exchange, error = await openrouter_call(ledger, "err", model="deepseek/deepseek-r1:free")
    assert isinstance(error, OpenRouterError)
    assert error.status_code == status
    if status == 429:
        assert error.data.error.code == payload["error"]["code"]  # type: ignore[attr-defined]
    assert exchange.body == orjson.dumps(payload)
    assert_row(
        await ledger.row(),
        exchange,
        {
            **base_columns(
                ledger,
                "/api/v1/chat/completions",
                requested_model="deepseek/deepseek-r1:free",
                status_code=status,
                outcome="upstream_error",
                error=payload["error"]["message"],
            ),
            **empty_completion_columns(),
        },
    )


async def test_html_error_page(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("html", json_reply(None, status=502, raw=HTML_502, content_type="text/html"))
    exchange, error = await openai_call(ledger, "html", model="gpt-4o")
    assert isinstance(error, openai.InternalServerError)
    assert exchange.body == HTML_502
    assert exchange.headers["content-type"].startswith("text/html")
    squeezed = " ".join(HTML_502.decode().split())
    assert_row(
        await ledger.row(),
        exchange,
        {
            **base_columns(
                ledger,
                "/v1/chat/completions",
                requested_model="gpt-4o",
                status_code=502,
                outcome="upstream_error",
                error=f"HTTP 502: {squeezed}",
            ),
            **empty_completion_columns(),
        },
    )


@pytest.mark.parametrize(
    "payload", [MODELS_LIST, {"status": "queued"}, [1, 2]], ids=["list", "object", "array"]
)
async def test_200_json_that_is_not_a_completion_is_unparsed(
    ledger: Ledger, upstream: FakeUpstream, payload: Any
) -> None:
    upstream.add("odd", json_reply(payload))
    async with aiohttp.ClientSession() as session:
        before = datetime.now(UTC)
        async with session.post(
            ledger.url + "/v1/chat/completions",
            json={"model": "gpt-4o"},
            headers={"X-Fake-Scenario": "odd", "Authorization": f"Bearer {KEY}"},
        ) as response:
            exchange = Exchange(
                response.status, response.headers, await response.read(), before, datetime.now(UTC)
            )
    assert exchange.body == orjson.dumps(payload)
    assert_row(
        await ledger.row(),
        exchange,
        {
            **base_columns(
                ledger,
                "/v1/chat/completions",
                requested_model="gpt-4o",
                outcome="unparsed",
                error="response could not be parsed as a chat completion",
            ),
            **empty_completion_columns(),
        },
    )


async def test_unknown_cost_is_null_not_zero(ledger: Ledger, upstream: FakeUpstream) -> None:
    exchange, _ = await openai_call(ledger, "basic", model="gpt-4o")
    row = await ledger.row()
    assert row["cost"] is None
    assert row["cost_source"] is None
    assert row["outcome"] == "ok"
    assert exchange.body == orjson.dumps(OPENAI_BASIC)
    async with ledger.engine.connect() as conn:
        assert (
            await conn.execute(text("SELECT count(*) FROM completions WHERE cost IS NULL"))
        ).scalar_one() == 1


async def test_tags_header_is_capped(ledger: Ledger, upstream: FakeUpstream) -> None:
    pairs = [f"k{n}=v{n}" for n in range(20)]
    too_long = "long=" + "x" * MAX_TAG_CHARS
    await openai_call(ledger, "basic", {"X-Ledger-Tags": ",".join([too_long, *pairs])}, model="gpt-4o")
    row = await ledger.row()
    assert row["tags"] == {f"k{n}": f"v{n}" for n in range(MAX_TAGS)}
    assert upstream.requests[0].headers.get("x-ledger-tags") is None
