"""Realistic SSE streams, shaped after ../shared/reference/wire-formats.md (ids and values invented).

A StreamCase holds the exact wire bytes an upstream sends (block by block: one event or comment block
each) and what the ledger must log for it. Expected values are written from the same constants that
build the chunks, never by running the parser under test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

LF = b"\n"
CRLF = b"\r\n"
CR = b"\r"

CUT_OFF_ERROR = "stream ended before the completion finished (no finish_reason, no [DONE])"


def data_block(
    obj: Any,
    nl: bytes = LF,
    *,
    event: bytes | None = None,
    space: bool = True,
    split_after: tuple[bytes, ...] = (),
    sort_keys: bool = False,
) -> bytes:
    """One event: optional `event:` line, the compact JSON as one or more `data:` lines, a blank line.

    split_after: cut the JSON into several `data:` lines after each of these markers (placed where
    JSON allows whitespace, so the `\\n`-joined payload is still the same JSON).
    """
    payload = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    parts = []
    for marker in split_after:
        head, found, payload = payload.partition(marker)
        assert found, marker
        parts.append(head + marker)
    parts.append(payload)
    prefix = b"data: " if space else b"data:"
    out = b"event: " + event + nl if event is not None else b""
    return out + b"".join(prefix + part + nl for part in parts) + nl


def comment_block(text: bytes, nl: bytes = LF) -> bytes:
    return b":" + text + nl + nl


def done_block(nl: bytes = LF) -> bytes:
    return b"data: [DONE]" + nl + nl


NULL_TOKENS: dict[str, Any] = {
    "prompt_tokens": None,
    "completion_tokens": None,
    "total_tokens": None,
    "cached_tokens": None,
    "cache_write_tokens": None,
    "reasoning_tokens": None,
    "cost": None,
    "cost_source": None,
    "usage": None,
}


@dataclass(frozen=True)
class StreamCase:
    name: str
    blocks: tuple[bytes, ...]
    row: dict[str, Any]
    choices: tuple[dict[str, Any], ...]
    chunks: tuple[dict[str, Any], ...]
    """The JSON chunks a client parses, in order, up to [DONE] (the error chunk included)."""
    usage_block: int | None = None
    """Index in `blocks` of the usage-only chunk the proxy removes when it asked for usage itself (None:
    there is none, or the upstream sends it unasked, as OpenRouter does, so the client gets it anyway)."""
    client_error: str | None = None
    """Message of the APIError the openai client raises on this stream."""
    text: dict[int, str] = field(default_factory=dict)
    """Content per choice index, as a client accumulates it."""
    tool_calls: dict[int, tuple[str, str]] = field(default_factory=dict)
    """(name, joined arguments) per tool-call index of choice 0."""

    @property
    def body(self) -> bytes:
        return b"".join(self.blocks)

    @property
    def proxied_body(self) -> bytes:
        """What a client that did not ask for usage receives (the proxy asked, then strips the chunk)."""
        return b"".join(b for i, b in enumerate(self.blocks) if i != self.usage_block)

    @property
    def client_chunks(self) -> list[dict[str, Any]]:
        """The chunks the openai client yields through the proxy (usage-only chunk removed, error raises)."""
        usage_chunk = self.chunks[-1] if self.usage_block is not None else None
        out = [c for c in self.chunks if c is not usage_chunk]
        return out[:-1] if self.client_error is not None else out


def _tokens(usage: dict[str, Any], **values: Any) -> dict[str, Any]:
    return {**NULL_TOKENS, "usage": usage, **values}


# --- OpenAI, stream_options.include_usage: usage null on every chunk, then a choices:[] usage chunk ---

_OPENAI = {
    "id": "chatcmpl-C3kQ9ZzXl2YpN8wUe7rTa1sMbVd4",
    "object": "chat.completion.chunk",
    "created": 1754321000,
    "model": "gpt-4o-mini-2024-07-18",
    "service_tier": "default",
    "system_fingerprint": "fp_560af6e559",
}
_OPENAI_USAGE = {
    "prompt_tokens": 1203,
    "completion_tokens": 7,
    "total_tokens": 1210,
    "prompt_tokens_details": {"cached_tokens": 1152, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
_OPENAI_WORDS = ("The", " sky", " is", " blue", " by", " day", ".")


def _openai_chunks(words: tuple[str, ...] = _OPENAI_WORDS, usage: bool = True) -> list[dict[str, Any]]:
    null = {"usage": None} if usage else {}
    chunks = [
        {
            **_OPENAI,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            **null,
            "obfuscation": "Vx3",
        },
    ]
    for number, word in enumerate(words):
        chunks.append(
            {
                **_OPENAI,
                "choices": [
                    {"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": None}
                ],
                **null,
                "obfuscation": "k" * number,
            }
        )
    chunks.append(
        {
            **_OPENAI,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
            **null,
            "obfuscation": "Qm",
        }
    )
    if usage:
        chunks.append({**_OPENAI, "choices": [], "usage": _OPENAI_USAGE, "obfuscation": "tB9aZ"})
    return chunks


def _openai_row(**extra: Any) -> dict[str, Any]:
    return {
        "completion_id": _OPENAI["id"],
        "object": "chat.completion.chunk",
        "created": _OPENAI["created"],
        "model": _OPENAI["model"],
        "provider": None,
        "system_fingerprint": _OPENAI["system_fingerprint"],
        "service_tier": _OPENAI["service_tier"],
        "outcome": "ok",
        "error": None,
        **_tokens(
            _OPENAI_USAGE,
            prompt_tokens=_OPENAI_USAGE["prompt_tokens"],
            completion_tokens=_OPENAI_USAGE["completion_tokens"],
            total_tokens=_OPENAI_USAGE["total_tokens"],
            cached_tokens=_OPENAI_USAGE["prompt_tokens_details"]["cached_tokens"],
            reasoning_tokens=_OPENAI_USAGE["completion_tokens_details"]["reasoning_tokens"],
        ),
        **extra,
    }


def _openai_case() -> StreamCase:
    chunks = _openai_chunks()
    return StreamCase(
        name="openai_include_usage",
        blocks=(*(data_block(c) for c in chunks), done_block()),
        row=_openai_row(),
        choices=({"index": 0, "finish_reason": "stop", "native_finish_reason": None, "role": "assistant"},),
        chunks=tuple(chunks),
        usage_block=len(chunks) - 1,
        text={0: "".join(_OPENAI_WORDS)},
    )


def _crlf_case() -> StreamCase:
    """The same OpenAI stream with CRLF line endings and a keep-alive comment."""
    chunks = _openai_chunks()
    blocks = [data_block(c, CRLF) for c in chunks]
    blocks.insert(2, comment_block(b"keepalive", CRLF))
    return StreamCase(
        name="crlf",
        blocks=(*blocks, done_block(CRLF)),
        row=_openai_row(),
        choices=({"index": 0, "finish_reason": "stop", "native_finish_reason": None, "role": "assistant"},),
        chunks=tuple(chunks),
        usage_block=len(blocks) - 1,
        text={0: "".join(_OPENAI_WORDS)},
    )


def _mixed_endings_case() -> StreamCase:
    """LF, CR and CRLF line endings mixed within one stream (all legal SSE); usage chunk ends in CRs."""
    chunks = _openai_chunks()
    endings = (LF, CR, CRLF)
    blocks = [data_block(c, endings[i % 3]) for i, c in enumerate(chunks[:-1])]
    blocks.append(data_block(chunks[-1], CR))
    return StreamCase(
        name="mixed_endings",
        blocks=(*blocks, done_block(CRLF)),
        row=_openai_row(),
        choices=({"index": 0, "finish_reason": "stop", "native_finish_reason": None, "role": "assistant"},),
        chunks=tuple(chunks),
        usage_block=len(blocks) - 1,
        text={0: "".join(_OPENAI_WORDS)},
    )


def _cut_off_case() -> StreamCase:
    """The upstream ends the stream (cleanly, at the HTTP level) in the middle of a chunk's JSON."""
    chunks = _openai_chunks(_OPENAI_WORDS[:3], usage=False)[:-1]  # role + 3 words, no finish chunk
    broken = data_block(_openai_chunks((" blue",), usage=False)[1])
    return StreamCase(
        name="cut_off",
        blocks=(*(data_block(c) for c in chunks), broken[: broken.index(b"blue")]),
        row={
            **_openai_row(),
            **NULL_TOKENS,
            "service_tier": "default",
            "outcome": "upstream_error",
            "error": CUT_OFF_ERROR,
        },
        choices=({"index": 0, "finish_reason": None, "native_finish_reason": None, "role": "assistant"},),
        chunks=tuple(chunks),
        text={0: "".join(_OPENAI_WORDS[:3])},
    )


# --- OpenRouter: processing comments, reasoning deltas, native finish reason, usage with cost ---

_OPENROUTER = {
    "id": "gen-1754321100-q8VbX2mLr0TzWc4p",
    "provider": "Anthropic",
    "model": "anthropic/claude-sonnet-4",
    "object": "chat.completion.chunk",
    "created": 1754321100,
}
_OPENROUTER_USAGE = {
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
}
_PROCESSING = b" OPENROUTER PROCESSING"


def _openrouter_delta(
    delta: dict[str, Any], finish: str | None = None, native: str | None = None
) -> dict[str, Any]:
    return {
        **_OPENROUTER,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", **delta},
                "finish_reason": finish,
                "native_finish_reason": native,
                "logprobs": None,
            }
        ],
    }


def _openrouter_case() -> StreamCase:
    thoughts = ("The user asks", " for the capital.")
    words = ("Paris", " is the capital of France.")
    chunks = [
        *(
            _openrouter_delta(
                {
                    "content": "",
                    "reasoning": t,
                    "reasoning_details": [
                        {"type": "reasoning.text", "text": t, "format": "anthropic-claude-v1", "index": 0}
                    ],
                }
            )
            for t in thoughts
        ),
        *(_openrouter_delta({"content": w}) for w in words),
        _openrouter_delta({"content": ""}, "stop", "end_turn"),
        {**_OPENROUTER, "choices": [], "system_fingerprint": None, "usage": _OPENROUTER_USAGE},
    ]
    blocks = [comment_block(_PROCESSING)] * 3 + [data_block(c) for c in chunks]
    blocks.insert(5, comment_block(_PROCESSING))  # a keep-alive between two content chunks
    return StreamCase(
        name="openrouter_reasoning_cost",
        blocks=(*blocks, done_block()),
        row={
            "completion_id": _OPENROUTER["id"],
            "object": "chat.completion.chunk",
            "created": _OPENROUTER["created"],
            "model": _OPENROUTER["model"],
            "provider": _OPENROUTER["provider"],
            "system_fingerprint": None,
            "service_tier": None,
            "outcome": "ok",
            "error": None,
            **_tokens(
                _OPENROUTER_USAGE,
                prompt_tokens=_OPENROUTER_USAGE["prompt_tokens"],
                completion_tokens=_OPENROUTER_USAGE["completion_tokens"],
                total_tokens=_OPENROUTER_USAGE["total_tokens"],
                cached_tokens=_OPENROUTER_USAGE["prompt_tokens_details"]["cached_tokens"],
                cache_write_tokens=_OPENROUTER_USAGE["prompt_tokens_details"]["cache_write_tokens"],
                reasoning_tokens=_OPENROUTER_USAGE["completion_tokens_details"]["reasoning_tokens"],
                cost=Decimal(str(_OPENROUTER_USAGE["cost"])),
                cost_source="upstream",
            ),
        },
        choices=(
            {"index": 0, "finish_reason": "stop", "native_finish_reason": "end_turn", "role": "assistant"},
        ),
        chunks=tuple(chunks),
        usage_block=None,  # OpenRouter always sends usage: the client would get it without the proxy too
        text={0: "".join(words)},
    )


_ERROR_BASE = {
    **_OPENROUTER,
    "id": "gen-1754321500-Er7xPq",
    "provider": "Chutes",
    "model": "deepseek/deepseek-r1",
}
_MIDSTREAM_ERROR = {
    "code": 502,
    "message": "Provider disconnected unexpectedly",
    "metadata": {"error_type": "provider_error", "provider_code": "overloaded"},
}


def _midstream_error_case() -> StreamCase:
    """OpenRouter after HTTP 200: a chunk with a top-level error and finish_reason "error", then [DONE]."""
    words = ("Once", " upon", " a")
    chunks = [
        {
            **_ERROR_BASE,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": w},
                    "finish_reason": None,
                    "native_finish_reason": None,
                }
            ],
        }
        for w in words
    ]
    chunks.append(
        {
            **_ERROR_BASE,
            "error": _MIDSTREAM_ERROR,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": ""},
                    "finish_reason": "error",
                    "native_finish_reason": "error",
                }
            ],
        }
    )
    return StreamCase(
        name="midstream_error",
        blocks=(comment_block(_PROCESSING), *(data_block(c) for c in chunks), done_block()),
        row={
            "completion_id": _ERROR_BASE["id"],
            "object": "chat.completion.chunk",
            "created": _ERROR_BASE["created"],
            "model": _ERROR_BASE["model"],
            "provider": _ERROR_BASE["provider"],
            "system_fingerprint": None,
            "service_tier": None,
            "outcome": "upstream_error",
            "error": _MIDSTREAM_ERROR["message"],
            **NULL_TOKENS,
        },
        choices=(
            {"index": 0, "finish_reason": "error", "native_finish_reason": "error", "role": "assistant"},
        ),
        chunks=tuple(chunks),
        client_error=_MIDSTREAM_ERROR["message"],
        text={0: "".join(words)},
    )


# --- Parallel tool calls: id/type/name only on each call's first fragment, arguments cut mid-token ---

_TOOLS = {
    **_OPENAI,
    "id": "chatcmpl-C3kTo0lCa11sPa4aLLeL",
    "model": "gpt-4.1-mini-2025-04-14",
    "system_fingerprint": "fp_6f2eabb9a5",
}
_TOOLS_USAGE = {
    "prompt_tokens": 82,
    "completion_tokens": 51,
    "total_tokens": 133,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
_CALLS = {
    0: ("call_8Yk2ZLq0", "get_weather", ('{"lo', 'cation": "Pa', 'ris"}')),
    1: ("call_3Nd7WmR1", "get_time", ('{"tz": ', '"Europe/', 'Oslo"}')),
}


def _tool_delta(call: dict[str, Any]) -> dict[str, Any]:
    return {
        **_TOOLS,
        "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}],
        "usage": None,
    }


def _tool_calls_case() -> StreamCase:
    chunks: list[dict[str, Any]] = [
        {
            **_TOOLS,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": None, "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": None,
        },
    ]
    for index, (call_id, name, pieces) in _CALLS.items():
        chunks.append(
            _tool_delta(
                {
                    "index": index,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            )
        )
        chunks.extend(_tool_delta({"index": index, "function": {"arguments": p}}) for p in pieces)
    chunks.append(
        {
            **_TOOLS,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}],
            "usage": None,
        }
    )
    chunks.append({**_TOOLS, "choices": [], "usage": _TOOLS_USAGE})
    return StreamCase(
        name="parallel_tool_calls",
        blocks=(*(data_block(c) for c in chunks), done_block()),
        row={
            "completion_id": _TOOLS["id"],
            "object": "chat.completion.chunk",
            "created": _TOOLS["created"],
            "model": _TOOLS["model"],
            "provider": None,
            "system_fingerprint": _TOOLS["system_fingerprint"],
            "service_tier": _TOOLS["service_tier"],
            "outcome": "ok",
            "error": None,
            **_tokens(
                _TOOLS_USAGE,
                prompt_tokens=82,
                completion_tokens=51,
                total_tokens=133,
                cached_tokens=0,
                reasoning_tokens=0,
            ),
        },
        choices=(
            {"index": 0, "finish_reason": "tool_calls", "native_finish_reason": None, "role": "assistant"},
        ),
        chunks=tuple(chunks),
        usage_block=len(chunks) - 1,
        tool_calls={i: (name, "".join(pieces)) for i, (_, name, pieces) in _CALLS.items()},
    )


# --- n=2: choices interleave, out of index order; choice 1 stops on length first ---

_N2 = {**_OPENAI, "id": "chatcmpl-C3kN2iNtErLeAvEd0x", "created": 1754321200}
_N2_USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}


def _n2_choice(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _n2_case() -> StreamCase:
    role = {"role": "assistant", "content": ""}
    chunks = [
        {**_N2, "choices": [_n2_choice(1, role)], "usage": None},
        {**_N2, "choices": [_n2_choice(0, role)], "usage": None},
        {
            **_N2,
            "choices": [_n2_choice(1, {"content": "Hi"}), _n2_choice(0, {"content": "Hello"})],
            "usage": None,
        },
        {**_N2, "choices": [_n2_choice(0, {"content": "!"})], "usage": None},
        {**_N2, "choices": [_n2_choice(1, {"content": " there, how can"})], "usage": None},
        {**_N2, "choices": [_n2_choice(1, {}, "length")], "usage": None},
        {**_N2, "choices": [_n2_choice(0, {}, "stop")], "usage": None},
        {**_N2, "choices": [], "usage": _N2_USAGE},
    ]
    return StreamCase(
        name="n2_interleaved",
        blocks=(*(data_block(c) for c in chunks), done_block()),
        row={
            **_openai_row(),
            "completion_id": _N2["id"],
            "created": _N2["created"],
            **_tokens(_N2_USAGE, prompt_tokens=9, completion_tokens=12, total_tokens=21),
        },
        choices=(
            {"index": 0, "finish_reason": "stop", "native_finish_reason": None, "role": "assistant"},
            {"index": 1, "finish_reason": "length", "native_finish_reason": None, "role": "assistant"},
        ),
        chunks=tuple(chunks),
        usage_block=len(chunks) - 1,
        text={0: "Hello!", 1: "Hi there, how can"},
    )


# --- Azure OpenAI: empty first chunk with prompt_filter_results, per-choice content_filter_results ---

_SAFE = {"filtered": False, "severity": "safe"}
_AZURE_FILTERS = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}
_AZURE = {
    "created": 1754321300,
    "id": "chatcmpl-AzR8pQ2nL5vXwYt0KmHs",
    "model": "gpt-4o-2024-11-20",
    "object": "chat.completion.chunk",
    "system_fingerprint": "fp_ee1d74bde0",
}


def _azure_case() -> StreamCase:
    words = ("Bonjour", " tout", " le monde")
    first = {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [
            {
                "prompt_index": 0,
                "content_filter_results": {
                    **_AZURE_FILTERS,
                    "jailbreak": {"filtered": False, "detected": False},
                },
            }
        ],
    }
    chunks = [
        first,
        {
            **_AZURE,
            "choices": [
                {
                    "content_filter_results": {},
                    "delta": {"content": "", "refusal": None, "role": "assistant"},
                    "finish_reason": None,
                    "index": 0,
                    "logprobs": None,
                }
            ],
        },
        *(
            {
                **_AZURE,
                "choices": [
                    {
                        "content_filter_results": _AZURE_FILTERS,
                        "delta": {"content": w},
                        "finish_reason": None,
                        "index": 0,
                        "logprobs": None,
                    }
                ],
            }
            for w in words
        ),
        {
            **_AZURE,
            "choices": [
                {
                    "content_filter_results": {},
                    "delta": {},
                    "finish_reason": "stop",
                    "index": 0,
                    "logprobs": None,
                }
            ],
        },
    ]
    return StreamCase(
        name="azure_empty_first_chunk",
        blocks=(*(data_block(c, sort_keys=True) for c in chunks), done_block()),
        row={
            "completion_id": _AZURE["id"],
            "object": "chat.completion.chunk",
            "created": _AZURE["created"],
            "model": _AZURE["model"],
            "provider": None,
            "system_fingerprint": _AZURE["system_fingerprint"],
            "service_tier": None,
            "outcome": "ok",
            "error": None,
            **NULL_TOKENS,
        },
        choices=({"index": 0, "finish_reason": "stop", "native_finish_reason": None, "role": "assistant"},),
        chunks=tuple(chunks),
        text={0: "".join(words)},
    )


# --- vLLM continuous usage: a running usage on every chunk, then a final usage-only chunk ---

_VLLM = {
    "id": "chatcmpl-9f0c2d4e8b7a4c1d9e3f5a6b7c8d9e0f",
    "object": "chat.completion.chunk",
    "created": 1754321400,
    "model": "meta-llama/Llama-3.1-8B-Instruct",
}
_VLLM_PROMPT = 17
_VLLM_WORDS = ("The", " capital", " is", " Paris", ".")


def _vllm_usage(completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": _VLLM_PROMPT,
        "total_tokens": _VLLM_PROMPT + completion,
        "completion_tokens": completion,
    }


def _vllm_case() -> StreamCase:
    n = len(_VLLM_WORDS)
    chunks = [
        {
            **_VLLM,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": _vllm_usage(0),
        }
    ]
    chunks += [
        {
            **_VLLM,
            "choices": [{"index": 0, "delta": {"content": w}, "logprobs": None, "finish_reason": None}],
            "usage": _vllm_usage(k + 1),
        }
        for k, w in enumerate(_VLLM_WORDS)
    ]
    chunks.append(
        {
            **_VLLM,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": ""},
                    "logprobs": None,
                    "finish_reason": "stop",
                    "stop_reason": None,
                }
            ],
            "usage": _vllm_usage(n),
        }
    )
    chunks.append({**_VLLM, "choices": [], "usage": _vllm_usage(n)})
    return StreamCase(
        name="vllm_continuous_usage",
        blocks=(*(data_block(c) for c in chunks), done_block()),
        row={
            "completion_id": _VLLM["id"],
            "object": "chat.completion.chunk",
            "created": _VLLM["created"],
            "model": _VLLM["model"],
            "provider": None,
            "system_fingerprint": None,
            "service_tier": None,
            "outcome": "ok",
            "error": None,
            **_tokens(
                _vllm_usage(n), prompt_tokens=_VLLM_PROMPT, completion_tokens=n, total_tokens=_VLLM_PROMPT + n
            ),
        },
        choices=({"index": 0, "finish_reason": "stop", "native_finish_reason": None, "role": "assistant"},),
        chunks=tuple(chunks),
        usage_block=len(chunks) - 1,
        text={0: "".join(_VLLM_WORDS)},
    )


def vllm_running_usage(events: int) -> dict[str, int]:
    """The running usage a vLLM stream carries after its first `events` chunks (role chunk: 0 tokens)."""
    return _vllm_usage(min(events - 1, len(_VLLM_WORDS)))


# --- Groq: usage only as x_groq.usage on the finish chunk ---

_GROQ = {
    "id": "chatcmpl-4b1f0a7e-2c3d-4e5f-9a8b-7c6d5e4f3a2b",
    "object": "chat.completion.chunk",
    "created": 1754321600,
    "model": "llama-3.3-70b-versatile",
    "service_tier": "on_demand",
    "system_fingerprint": "fp_3f3b593e33",
}
_GROQ_USAGE = {
    "queue_time": 0.048312,
    "prompt_tokens": 48,
    "prompt_time": 0.002801,
    "completion_tokens": 9,
    "completion_time": 0.032727,
    "total_tokens": 57,
    "total_time": 0.035528,
}


def _groq_case() -> StreamCase:
    words = ("Hello", "!", " How", " can", " I", " help", "?")
    chunks = [
        {
            **_GROQ,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "x_groq": {"id": "req_01k1m3q8v2e9fbq4c7x0r5t6y2"},
        }
    ]
    chunks += [
        {**_GROQ, "choices": [{"index": 0, "delta": {"content": w}, "logprobs": None, "finish_reason": None}]}
        for w in words
    ]
    chunks.append(
        {
            **_GROQ,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
            "x_groq": {"id": "req_01k1m3q8v2e9fbq4c7x0r5t6y2", "usage": _GROQ_USAGE},
        }
    )
    return StreamCase(
        name="groq_x_groq_usage",
        blocks=(*(data_block(c) for c in chunks), done_block()),
        row={
            "completion_id": _GROQ["id"],
            "object": "chat.completion.chunk",
            "created": _GROQ["created"],
            "model": _GROQ["model"],
            "provider": None,
            "system_fingerprint": _GROQ["system_fingerprint"],
            "service_tier": "on_demand",
            "outcome": "ok",
            "error": None,
            **_tokens(_GROQ_USAGE, prompt_tokens=48, completion_tokens=9, total_tokens=57),
        },
        choices=({"index": 0, "finish_reason": "stop", "native_finish_reason": None, "role": "assistant"},),
        chunks=tuple(chunks),
        text={0: "".join(words)},
    )


# --- llama.cpp server: trailing choices:[] chunk with usage and timings ---

_LLAMA = {
    "created": 1754321700,
    "id": "chatcmpl-Jh3mK9pQ2xV7nB4wL8sD1fG6",
    "model": "Qwen3-8B-Q4_K_M.gguf",
    "system_fingerprint": "b6497-cd08fc3e",
    "object": "chat.completion.chunk",
}
_LLAMA_USAGE = {"completion_tokens": 12, "prompt_tokens": 25, "total_tokens": 37}
_LLAMA_TIMINGS = {
    "cache_n": 0,
    "prompt_n": 25,
    "prompt_ms": 40.101,
    "prompt_per_token_ms": 1.604,
    "prompt_per_second": 623.426,
    "predicted_n": 12,
    "predicted_ms": 180.502,
    "predicted_per_token_ms": 15.042,
    "predicted_per_second": 66.481,
}


def _llamacpp_case() -> StreamCase:
    words = ("Sure", ",", " here", " you", " go", ".")
    chunks = [
        {
            "choices": [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}],
            **_LLAMA,
        }
    ]
    chunks += [
        {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": w}}], **_LLAMA} for w in words
    ]
    chunks.append({"choices": [{"finish_reason": "stop", "index": 0, "delta": {}}], **_LLAMA})
    chunks.append({"choices": [], **_LLAMA, "usage": _LLAMA_USAGE, "timings": _LLAMA_TIMINGS})
    return StreamCase(
        name="llamacpp_timings",
        blocks=(*(data_block(c) for c in chunks), done_block()),
        row={
            "completion_id": _LLAMA["id"],
            "object": "chat.completion.chunk",
            "created": _LLAMA["created"],
            "model": _LLAMA["model"],
            "provider": None,
            "system_fingerprint": _LLAMA["system_fingerprint"],
            "service_tier": None,
            "outcome": "ok",
            "error": None,
            **_tokens(_LLAMA_USAGE, prompt_tokens=25, completion_tokens=12, total_tokens=37),
        },
        choices=({"index": 0, "finish_reason": "stop", "native_finish_reason": None, "role": "assistant"},),
        chunks=tuple(chunks),
        usage_block=len(chunks) - 1,
        text={0: "".join(words)},
    )


# --- SSE edge cases: multi-line data, `data:` without a space, `event: message`, non-ASCII ---

_EDGE = {**_OPENAI, "id": "chatcmpl-C3kEdGeCaSeS0001", "service_tier": None, "system_fingerprint": None}


def _multiline_case() -> StreamCase:
    words = ("Grüße", " aus", " Köln: 5 €", " 🙂")
    chunks = [
        {
            **_EDGE,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        }
    ]
    chunks += [
        {**_EDGE, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words
    ]
    chunks.append({**_EDGE, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    blocks = [
        data_block(chunks[0], space=False),
        comment_block(b"keepalive"),
        data_block(chunks[1], event=b"message", split_after=(b'"choices":',)),
        data_block(chunks[2], split_after=(b"{", b'"delta":')),
        data_block(chunks[3], event=b"message", space=False, split_after=(b'"object":',)),
        data_block(chunks[4]),
        data_block(chunks[5], split_after=(b'"finish_reason":',)),
        done_block(),
    ]
    return StreamCase(
        name="multiline_data",
        blocks=tuple(blocks),
        row={
            **_openai_row(),
            **NULL_TOKENS,
            "completion_id": _EDGE["id"],
            "service_tier": None,
            "system_fingerprint": None,
        },
        choices=({"index": 0, "finish_reason": "stop", "native_finish_reason": None, "role": "assistant"},),
        chunks=tuple(chunks),
        text={0: "".join(words)},
    )


OPENAI_INCLUDE_USAGE = _openai_case()
OPENROUTER = _openrouter_case()
TOOL_CALLS = _tool_calls_case()
N2 = _n2_case()
AZURE = _azure_case()
VLLM = _vllm_case()
GROQ = _groq_case()
LLAMACPP = _llamacpp_case()
CRLF_STREAM = _crlf_case()
MIXED_ENDINGS = _mixed_endings_case()
MULTILINE = _multiline_case()
MIDSTREAM_ERROR = _midstream_error_case()
CUT_OFF = _cut_off_case()

CASES: tuple[StreamCase, ...] = (
    OPENAI_INCLUDE_USAGE,
    OPENROUTER,
    TOOL_CALLS,
    N2,
    AZURE,
    VLLM,
    GROQ,
    LLAMACPP,
    CRLF_STREAM,
    MIXED_ENDINGS,
    MULTILINE,
    MIDSTREAM_ERROR,
    CUT_OFF,
)


def openai_like(usage: bool) -> bytes:
    """What an OpenAI upstream sends: with include_usage, `"usage":null` on each chunk and the usage-only
    chunk (that is OPENAI_INCLUDE_USAGE); without, neither."""
    if usage:
        return OPENAI_INCLUDE_USAGE.body
    return b"".join(data_block(c) for c in _openai_chunks(usage=False)) + done_block()


OPENAI_LIKE_USAGE = _OPENAI_USAGE
OPENAI_LIKE_TEXT = "".join(_OPENAI_WORDS)
