"""Recorded-shape bodies and streams of the non-chat APIs: OpenAI Responses, embeddings, legacy
completions, Anthropic Messages, and OpenRouter BYOK usage.

Shapes follow the official SDKs' models (openai 3.x `types/responses`, `CreateEmbeddingResponse`,
`Completion`; anthropic `Message`, `Usage`, `MessageDeltaUsage`, the raw stream events) and the
providers' docs; ids and values are invented. Streams are the exact wire bytes: `event:` lines where the
API sends them, compact JSON, each event ended by a blank line.
"""

from __future__ import annotations

import base64
import copy
import struct
from typing import Any

import orjson

# ---- SSE ----------------------------------------------------------------------------------------


def named_event(data: dict[str, Any], name: str | None = None) -> bytes:
    """One SSE block with an `event:` line (the event's `type` unless named) and compact JSON data."""
    return b"event: %s\ndata: %s\n\n" % ((name or data["type"]).encode(), orjson.dumps(data))


def data_event(data: dict[str, Any] | str) -> bytes:
    payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
    return b"data: " + payload + b"\n\n"


# ---- OpenAI Responses API -----------------------------------------------------------------------

RESPONSE_ID = "resp_68af0d3e5b8c8193a1c2d4e6f8091a2b0c3d4e5f6a7b8c9d"
RESPONSE_CREATED = 1756302654
RESPONSE_TEXT = ["The", " sky", " is", " blue", " because", " of", " Rayleigh", " scattering", "."]
RESPONSES_USAGE: dict[str, Any] = {
    "input_tokens": 1834,
    "input_tokens_details": {"cached_tokens": 1536, "cache_write_tokens": 0},
    "output_tokens": 356,
    "output_tokens_details": {"reasoning_tokens": 320},
    "total_tokens": 2190,
}


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "msg_68af0d40a1b48193b2c3d4e5f6a7b8c9",
        "type": "message",
        "status": status,
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
        "role": "assistant",
    }


def _reasoning_item() -> dict[str, Any]:
    return {"id": "rs_68af0d3f0e7c8193a9b8c7d6e5f4a3b2", "type": "reasoning", "summary": []}


def response_object(
    status: str = "completed",
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = RESPONSES_USAGE,
    **extra: Any,
) -> dict[str, Any]:
    """A Response as the API returns it (openai.types.responses.Response)."""
    body: dict[str, Any] = {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": RESPONSE_CREATED,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "max_tool_calls": None,
        "model": "o4-mini-2025-04-16",
        "output": output if output is not None else [_reasoning_item(), _message_item("".join(RESPONSE_TEXT))],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "prompt_cache_key": None,
        "reasoning": {"effort": "medium", "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": copy.deepcopy(usage),
        "user": None,
        "metadata": {},
    }
    body.update(extra)
    return body


RESPONSES_BASIC = response_object()
RESPONSES_TOOL_CALL = response_object(
    output=[
        _reasoning_item(),
        {
            "id": "fc_68af0d41c2d08193a0b1c2d3e4f5a6b7",
            "type": "function_call",
            "status": "completed",
            "arguments": '{"location":"Paris, France"}',
            "call_id": "call_Xk2mP9qLr4sT7vW1",
            "name": "get_weather",
        },
    ],
    usage={**RESPONSES_USAGE, "output_tokens": 94, "total_tokens": 1928},
)
RESPONSES_INCOMPLETE = response_object(
    status="incomplete",
    output=[_reasoning_item(), _message_item("The sky is", status="incomplete")],
    incomplete_details={"reason": "max_output_tokens"},
    max_output_tokens=64,
    usage={**RESPONSES_USAGE, "output_tokens": 64, "total_tokens": 1898},
)
RESPONSES_ERROR_400: dict[str, Any] = {
    "error": {
        "message": "Invalid value: 'gpt-9'. Supported models are listed at /v1/models.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
}


def responses_stream(final: dict[str, Any], text: list[str] | None = None, terminal: str | None = None) -> bytes:
    """The events of a streamed Response: created, in_progress, the message item and its text deltas,
    the done events, then `terminal` (response.completed unless given) with the final Response."""
    text = RESPONSE_TEXT if text is None else text
    started = {**final, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    seq = iter(range(10_000))
    item = _message_item("".join(text))
    empty_item = {**item, "status": "in_progress", "content": []}
    part = item["content"][0]
    events = [
        {"type": "response.created", "sequence_number": next(seq), "response": started},
        {"type": "response.in_progress", "sequence_number": next(seq), "response": started},
        {"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0, "item": empty_item},
        {
            "type": "response.content_part.added",
            "sequence_number": next(seq),
            "item_id": item["id"],
            "output_index": 0,
            "content_index": 0,
            "part": {**part, "text": ""},
        },
    ]
    for piece in text:
        events.append(
            {
                "type": "response.output_text.delta",
                "sequence_number": next(seq),
                "item_id": item["id"],
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
                "logprobs": [],
                "obfuscation": "aB3dE",
            }
        )
    events += [
        {
            "type": "response.output_text.done",
            "sequence_number": next(seq),
            "item_id": item["id"],
            "output_index": 0,
            "content_index": 0,
            "text": "".join(text),
            "logprobs": [],
        },
        {
            "type": "response.content_part.done",
            "sequence_number": next(seq),
            "item_id": item["id"],
            "output_index": 0,
            "content_index": 0,
            "part": part,
        },
        {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0, "item": item},
    ]
    kind = terminal or {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
        final["status"], "response.failed"
    )
    events.append({"type": kind, "sequence_number": next(seq), "response": final})
    return b"".join(named_event(event) for event in events)


RESPONSES_FAILED = response_object(
    status="failed",
    output=[],
    usage=None,
    error={"code": "server_error", "message": "The model produced invalid content. Retry your request."},
)
RESPONSES_STREAM = responses_stream(RESPONSES_BASIC)
RESPONSES_FAILED_STREAM = responses_stream(RESPONSES_FAILED, text=["The", " sky"])
RESPONSES_ERROR_EVENT = {
    "type": "error",
    "code": "rate_limit_exceeded",
    "message": "Rate limit reached for o4-mini in organization org-abc on tokens per min (TPM).",
    "param": None,
    "sequence_number": 7,
}


# ---- embeddings ---------------------------------------------------------------------------------

EMBEDDING_VECTORS = [
    [0.0023064255, -0.009327292, 0.015797347, -0.0077780345, 0.004598291, 0.020145798, -0.012473, 0.0],
    [-0.011240916, 0.0043375785, -0.007391627, 0.019284107, 0.0, -0.0016345879, 0.008211533, -0.0039177],
]
EMBEDDINGS_USAGE = {"prompt_tokens": 13, "total_tokens": 13}


def embeddings_body(encoding_format: str = "float") -> dict[str, Any]:
    """CreateEmbeddingResponse; with base64 (what the openai SDK asks for by default) each vector is
    little-endian float32 bytes, base64-encoded."""
    data = []
    for index, vector in enumerate(EMBEDDING_VECTORS):
        embedding: Any = vector
        if encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "data": data, "model": "text-embedding-3-small", "usage": dict(EMBEDDINGS_USAGE)}


# ---- legacy completions -------------------------------------------------------------------------

TEXT_COMPLETION: dict[str, Any] = {
    "id": "cmpl-BGxVn3ZkD2r4oFqTbXc8YwPe1LmNa",
    "object": "text_completion",
    "created": 1743610123,
    "model": "gpt-3.5-turbo-instruct:20230824-v2",
    "choices": [
        {"text": "\n\nThis is indeed a test", "index": 0, "logprobs": None, "finish_reason": "length"},
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    "system_fingerprint": None,
}
TEXT_PIECES = ["\n\n", "This", " is", " indeed", " a", " test", "."]
TEXT_STREAM_USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def text_completion_stream(usage: bool) -> bytes:
    """A legacy completions stream: text chunks, a finish chunk, the usage-only chunk when it was asked
    for (stream_options.include_usage), then [DONE]."""
    base = {"id": TEXT_COMPLETION["id"], "object": "text_completion", "created": TEXT_COMPLETION["created"]}
    model = TEXT_COMPLETION["model"]
    blocks = []
    for position, piece in enumerate(TEXT_PIECES):
        finish = "stop" if position == len(TEXT_PIECES) - 1 else None
        choice = {"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}
        blocks.append(data_event({**base, "choices": [choice], "model": model, "system_fingerprint": None}))
    if usage:
        blocks.append(data_event({**base, "model": model, "choices": [], "usage": TEXT_STREAM_USAGE}))
    blocks.append(data_event("[DONE]"))
    return b"".join(blocks)


# ---- Anthropic Messages -------------------------------------------------------------------------

MESSAGE_ID = "msg_01XFDUDYJgAACzvnptvVoYEL"
MESSAGE_MODEL = "claude-sonnet-4-5-20250929"
MESSAGE_TEXT = ["Rayleigh", " scattering", ": shorter", " wavelengths", " scatter", " more", "."]
MESSAGE_USAGE: dict[str, Any] = {
    "input_tokens": 21,
    "cache_creation_input_tokens": 1250,
    "cache_read_input_tokens": 2048,
    "cache_creation": {"ephemeral_5m_input_tokens": 1250, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 131,
    "service_tier": "standard",
    "server_tool_use": None,
}


def message_body(
    content: list[dict[str, Any]] | None = None,
    stop_reason: str = "end_turn",
    usage: dict[str, Any] | None = None,
    model: str = MESSAGE_MODEL,
) -> dict[str, Any]:
    """An Anthropic Message (anthropic.types.Message)."""
    return {
        "id": MESSAGE_ID,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content if content is not None else [{"type": "text", "text": "".join(MESSAGE_TEXT)}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": copy.deepcopy(usage if usage is not None else MESSAGE_USAGE),
    }


MESSAGE_BASIC = message_body()
MESSAGE_TOOL_USE = message_body(
    content=[
        {"type": "text", "text": "I'll check the weather in Paris."},
        {
            "type": "tool_use",
            "id": "toolu_01A09q90qw90lq917835lq9",
            "name": "get_weather",
            "input": {"location": "Paris, France"},
        },
    ],
    stop_reason="tool_use",
    usage={"input_tokens": 412, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 74},
)
MESSAGE_OVERLOADED: dict[str, Any] = {
    "type": "error",
    "error": {"type": "overloaded_error", "message": "Overloaded"},
    "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
}

# message_start carries the input and cache counts (output_tokens small); message_delta the cumulative
# output count (and, on current API versions, the input and cache counts again)
STREAM_START_USAGE: dict[str, Any] = {
    "input_tokens": 472,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 3100,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 3,
    "service_tier": "standard",
}
STREAM_DELTA_USAGE: dict[str, Any] = {
    "input_tokens": 472,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 3100,
    "output_tokens": 89,
}


def message_stream(
    text: list[str] | None = None,
    stop_reason: str = "end_turn",
    start_usage: dict[str, Any] | None = None,
    delta_usage: dict[str, Any] | None = None,
    model: str = MESSAGE_MODEL,
    error_after: int | None = None,
) -> bytes:
    """A streamed Message: message_start, a text block (with a ping), message_delta, message_stop.
    error_after: an `overloaded_error` event after that many deltas, and nothing more."""
    text = MESSAGE_TEXT if text is None else text
    start = {
        **message_body(content=[], model=model),
        "stop_reason": None,
        "usage": dict(start_usage if start_usage is not None else STREAM_START_USAGE),
    }
    blocks = [
        named_event({"type": "message_start", "message": start}),
        named_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        named_event({"type": "ping"}),
    ]
    for position, piece in enumerate(text):
        if error_after is not None and position == error_after:
            blocks.append(named_event({"type": "error", "error": MESSAGE_OVERLOADED["error"]}))
            return b"".join(blocks)
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        blocks.append(named_event(delta))
    blocks += [
        named_event({"type": "content_block_stop", "index": 0}),
        named_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": dict(delta_usage if delta_usage is not None else STREAM_DELTA_USAGE),
            }
        ),
        named_event({"type": "message_stop"}),
    ]
    return b"".join(blocks)


MESSAGE_STREAM = message_stream()


# ---- OpenRouter BYOK ----------------------------------------------------------------------------

# with BYOK, usage.cost is OpenRouter's fee alone; the provider's charge is upstream_inference_cost
BYOK_USAGE: dict[str, Any] = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "cost": 0.000405,
    "is_byok": True,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "cost_details": {
        "upstream_inference_cost": 0.0081,
        "upstream_inference_prompt_cost": 0.0036,
        "upstream_inference_completions_cost": 0.0045,
    },
    "completion_tokens_details": {"reasoning_tokens": 0, "image_tokens": 0},
}
BYOK_COMPLETION: dict[str, Any] = {
    "id": "gen-1756400000-Byok7Qz2mXc4VnR8",
    "provider": "OpenAI",
    "model": "openai/gpt-4o",
    "object": "chat.completion",
    "created": 1756400000,
    "choices": [
        {
            "logprobs": None,
            "finish_reason": "stop",
            "native_finish_reason": "stop",
            "index": 0,
            "message": {"role": "assistant", "content": "Paris.", "refusal": None, "reasoning": None},
        }
    ],
    "system_fingerprint": "fp_07871e2ad8",
    "usage": BYOK_USAGE,
}
