"""Realistic response bodies and streams, shaped after ../shared/reference/wire-formats.md.

Ids and values are invented; the shapes follow the providers' SDKs and docs.
"""

from __future__ import annotations

from typing import Any

import orjson

OPENAI_BASIC: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "The sky is blue because of Rayleigh scattering.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 46,
        "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}

OPENAI_TOOL_CALLS: dict[str, Any] = {
    "id": "chatcmpl-tool-7f3a",
    "object": "chat.completion",
    "created": 1741570300,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
                    },
                    {
                        "id": "call_def",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Oslo"}'},
                    },
                ],
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 82, "completion_tokens": 51, "total_tokens": 133},
    "system_fingerprint": "fp_0ba0d124f1",
}

OPENAI_N2: dict[str, Any] = {
    "id": "chatcmpl-n2-19c",
    "object": "chat.completion",
    "created": 1741570400,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"},
        {
            "index": 1,
            "message": {"role": "assistant", "content": "Hi there, how can"},
            "finish_reason": "length",
        },
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
}

OPENROUTER_WITH_COST: dict[str, Any] = {
    "id": "gen-1741570500-AbCdEfGhIjKlMnOp",
    "provider": "Anthropic",
    "model": "anthropic/claude-sonnet-4",
    "object": "chat.completion",
    "created": 1741570500,
    "choices": [
        {
            "logprobs": None,
            "finish_reason": "stop",
            "native_finish_reason": "end_turn",
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Paris.",
                "refusal": None,
                "reasoning": "The user asks for the capital of France.",
                "reasoning_details": [
                    {
                        "type": "reasoning.text",
                        "text": "The user asks...",
                        "format": "anthropic-claude-v1",
                        "index": 0,
                    }
                ],
            },
        }
    ],
    "system_fingerprint": None,
    "usage": {
        "prompt_tokens": 2400,
        "completion_tokens": 120,
        "total_tokens": 2520,
        "cost": 0.0087495,
        "is_byok": False,
        "prompt_tokens_details": {"cached_tokens": 2048, "cache_write_tokens": 100, "audio_tokens": 0},
        "cost_details": {
            "upstream_inference_cost": None,
            "upstream_inference_prompt_cost": 0.0069495,
            "upstream_inference_completions_cost": 0.0018,
        },
        "completion_tokens_details": {"reasoning_tokens": 40, "image_tokens": 0},
    },
}

OPENAI_ERROR_401: dict[str, Any] = {
    "error": {
        "message": "Incorrect API key provided: sk-proj-****abcd. You can find your API key at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}

OPENAI_ERROR_429: dict[str, Any] = {
    "error": {
        "message": "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000",
        "type": "tokens",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}

OPENROUTER_ERROR_429: dict[str, Any] = {
    "error": {
        "code": 429,
        "message": "Provider returned error",
        "metadata": {
            "raw": "deepseek/deepseek-r1:free is temporarily rate-limited upstream",
            "provider_name": "Chutes",
        },
    },
    "user_id": "user_2abc",
}

HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)


def sse(
    *events: Any, comments: dict[int, str] | None = None, done: bool = True, newline: bytes = b"\n"
) -> bytes:
    """Encode chunks as SSE: compact JSON `data:` lines, each event ended by a blank line."""
    out = bytearray()
    for position, event in enumerate(events):
        if comments and position in comments:
            out += b": " + comments[position].encode() + newline + newline
        payload = event if isinstance(event, bytes) else orjson.dumps(event)
        out += b"data: " + payload + newline + newline
    if done:
        out += b"data: [DONE]" + newline + newline
    return bytes(out)


def _chunk(base: dict[str, Any], choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {**base, "choices": choices, **extra}


_OPENAI_BASE = {
    "id": "chatcmpl-stream-8a7",
    "object": "chat.completion.chunk",
    "created": 1741570600,
    "model": "gpt-4o-mini-2024-07-18",
    "service_tier": "default",
    "system_fingerprint": "fp_44709d6fcb",
}


def openai_stream(include_usage: bool = True) -> bytes:
    """OpenAI's stream: role chunk, content deltas, finish chunk, then (if asked) the usage-only chunk."""
    usage_null = {"usage": None} if include_usage else {}
    chunks: list[Any] = [
        _chunk(
            _OPENAI_BASE,
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            **usage_null,
            obfuscation="a1",
        ),
    ]
    for word in ("The", " sky", " is", " blue", "."):
        chunks.append(
            _chunk(
                _OPENAI_BASE,
                [{"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": None}],
                **usage_null,
                obfuscation="xyz",
            )
        )
    chunks.append(
        _chunk(
            _OPENAI_BASE,
            [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
            **usage_null,
            obfuscation="q",
        )
    )
    if include_usage:
        chunks.append(
            _chunk(
                _OPENAI_BASE,
                [],
                usage={
                    "prompt_tokens": 19,
                    "completion_tokens": 5,
                    "total_tokens": 24,
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
                },
                obfuscation="zz",
            )
        )
    return sse(*chunks)


OPENAI_STREAM_USAGE = {"prompt_tokens": 19, "completion_tokens": 5, "total_tokens": 24}

_OPENROUTER_BASE = {
    "id": "gen-1741570700-StReAm",
    "provider": "Google",
    "model": "google/gemini-2.5-pro",
    "object": "chat.completion.chunk",
    "created": 1741570700,
}


def openrouter_stream() -> bytes:
    """OpenRouter: processing comments (also mid-stream), reasoning deltas, native finish reason, cost."""
    chunks: list[Any] = [
        _chunk(
            _OPENROUTER_BASE,
            [
                {
                    "index": 0,
                    "delta": {
                        "role": "assistant",
                        "content": "",
                        "reasoning": "Think",
                        "reasoning_details": [{"type": "reasoning.text", "text": "Think", "index": 0}],
                    },
                    "finish_reason": None,
                    "native_finish_reason": None,
                }
            ],
        ),
        _chunk(
            _OPENROUTER_BASE,
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "Par"},
                    "finish_reason": None,
                    "native_finish_reason": None,
                }
            ],
        ),
        _chunk(
            _OPENROUTER_BASE,
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "is."},
                    "finish_reason": None,
                    "native_finish_reason": None,
                }
            ],
        ),
        _chunk(
            _OPENROUTER_BASE,
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": "stop",
                    "native_finish_reason": "STOP",
                }
            ],
        ),
        _chunk(
            _OPENROUTER_BASE,
            [],
            usage={
                "prompt_tokens": 14,
                "completion_tokens": 30,
                "total_tokens": 44,
                "cost": 0.000317,
                "is_byok": False,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 22},
            },
        ),
    ]
    head = b": OPENROUTER PROCESSING\n\n" * 3
    return head + sse(*chunks, comments={2: "OPENROUTER PROCESSING"})


def midstream_error_stream() -> bytes:
    base = dict(_OPENROUTER_BASE, id="gen-err-1")
    return sse(
        _chunk(
            base, [{"index": 0, "delta": {"role": "assistant", "content": "Once"}, "finish_reason": None}]
        ),
        _chunk(base, [{"index": 0, "delta": {"content": " upon"}, "finish_reason": None}]),
        {
            **_chunk(base, [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]),
            "error": {
                "code": 502,
                "message": "Provider disconnected unexpectedly",
                "metadata": {"error_type": "provider_error", "provider_code": "overloaded"},
            },
        },
    )


OPENAI_ERROR_429_QUOTA: dict[str, Any] = {
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}

OPENROUTER_ERROR_401: dict[str, Any] = {"error": {"code": 401, "message": "No auth credentials found"}}

OPENROUTER_CHOICE_ERROR: dict[str, Any] = {
    "id": "gen-1741570800-ChOiCeErR",
    "provider": "Together",
    "model": "meta-llama/llama-3.3-70b-instruct",
    "object": "chat.completion",
    "created": 1741570800,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": ""},
            "finish_reason": "error",
            "native_finish_reason": "error",
            "error": {
                "code": 502,
                "message": "Upstream provider returned an invalid response",
                "metadata": {"provider_name": "Together"},
            },
        }
    ],
    "usage": {"prompt_tokens": 31, "completion_tokens": 0, "total_tokens": 31, "cost": 0},
}

RESPONSES_API_BASIC: dict[str, Any] = {
    "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    "object": "response",
    "created_at": 1741476542,
    "status": "completed",
    "model": "o4-mini-2025-04-16",
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi.", "annotations": []}],
        },
    ],
    "service_tier": "default",
    "usage": {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 12},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 64},
        "total_tokens": 123,
    },
}

DEEPSEEK_REASONER: dict[str, Any] = {
    "id": "930c60df-bf64-41c9-a88e-3ec75f81e00e",
    "object": "chat.completion",
    "created": 1741570900,
    "model": "deepseek-reasoner",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "9.11 < 9.8", "reasoning_content": "Compare..."},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 17,
        "completion_tokens": 420,
        "total_tokens": 437,
        "prompt_tokens_details": {"cached_tokens": None},
        "completion_tokens_details": {"reasoning_tokens": 380},
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": 17,
    },
    "system_fingerprint": "fp_7e73fd9a08",
}

GROQ_X_GROQ_USAGE: dict[str, Any] = {
    "id": "chatcmpl-groq-5b1",
    "object": "chat.completion",
    "created": 1741571000,
    "model": "llama-3.3-70b-versatile",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
    "x_groq": {
        "id": "req_01jq",
        "usage": {
            "queue_time": 0.02,
            "prompt_tokens": 40,
            "prompt_time": 0.003,
            "completion_tokens": 9,
            "completion_time": 0.03,
            "total_tokens": 49,
            "total_time": 0.033,
        },
    },
    "service_tier": "on_demand",
}

MODELS_LIST: dict[str, Any] = {
    "object": "list",
    "data": [{"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"}],
}
