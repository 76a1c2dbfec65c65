"""Token usage objects of every API mapped onto the ledger's token columns (OpenAI's convention).

`prompt_tokens` counts every input token, cached ones included; `cached_tokens` are cache reads,
`cache_write_tokens` cache writes, `completion_tokens` every output token (reasoning included).
"""

from __future__ import annotations

from typing import Any

import orjson

from .fields import as_amount, as_count, detail_count, first_count, member
from .record import CompletionRecord

MAX_USAGE_JSON_BYTES = 64 * 1024
_PROMPT_DETAILS = ("prompt_tokens_details", "input_tokens_details")
_COMPLETION_DETAILS = ("completion_tokens_details", "output_tokens_details")
_ANTHROPIC_OUTPUT_DETAILS = ("output_tokens_details",)
_CACHE_TTLS = ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")


def apply_usage(record: CompletionRecord, usage: dict[str, Any]) -> None:
    """Map a usage object (OpenAI, OpenRouter, Responses API, DeepSeek, Anthropic-style) to columns."""
    # each field from the first source that has it as a count; later sources are looked up only if needed
    get = usage.get
    prompt = as_count(get("prompt_tokens"))
    if prompt is None:
        prompt = as_count(get("input_tokens"))
    completion = as_count(get("completion_tokens"))
    if completion is None:
        completion = as_count(get("output_tokens"))
    total = as_count(get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    record.prompt_tokens, record.completion_tokens, record.total_tokens = prompt, completion, total
    cached = detail_count(usage, _PROMPT_DETAILS, "cached_tokens")
    if cached is None:
        cached = first_count(get("prompt_cache_hit_tokens"), get("cache_read_input_tokens"))
    record.cached_tokens = cached
    cache_write = detail_count(usage, _PROMPT_DETAILS, "cache_write_tokens")
    if cache_write is None:
        cache_write = as_count(get("cache_creation_input_tokens"))
    record.cache_write_tokens = cache_write
    record.reasoning_tokens = detail_count(usage, _COMPLETION_DETAILS, "reasoning_tokens")
    apply_cost(record, usage)


def apply_messages_usage(record: CompletionRecord, usage: dict[str, Any]) -> None:
    """Anthropic's usage: its `input_tokens` leaves out cache reads and writes, so prompt_tokens adds them
    back (input + cache_read + cache_creation), as OpenAI counts."""
    get = usage.get
    uncached = as_count(get("input_tokens"))
    read = as_count(get("cache_read_input_tokens"))
    written = as_count(get("cache_creation_input_tokens"))
    if written is None:  # only the split by cache lifetime
        split = get("cache_creation")
        if isinstance(split, dict):
            counts = [as_count(split.get(name)) for name in _CACHE_TTLS]
            known = [count for count in counts if count is not None]
            written = sum(known) if known else None
    prompt = uncached + (read or 0) + (written or 0) if uncached is not None else None
    completion = as_count(get("output_tokens"))
    record.prompt_tokens, record.completion_tokens = prompt, completion
    record.total_tokens = prompt + completion if prompt is not None and completion is not None else None
    record.cached_tokens, record.cache_write_tokens = read, written
    record.reasoning_tokens = detail_count(usage, _ANTHROPIC_OUTPUT_DETAILS, "thinking_tokens")
    apply_cost(record, usage)


def apply_cost(record: CompletionRecord, usage: dict[str, Any]) -> None:
    """The upstream's own cost (OpenRouter's `usage.cost`), and the raw usage object kept whole.

    With BYOK (`is_byok: true`) `cost` is only OpenRouter's fee; the provider's charge is
    `cost_details.upstream_inference_cost`, and the call cost their sum. A BYOK usage without that
    charge leaves the cost unknown (NULL, left to the price table), never the fee alone."""
    cost = as_amount(usage.get("cost"))
    if cost is not None and usage.get("is_byok") is True:
        charge = as_amount(member(usage.get("cost_details"), "upstream_inference_cost"))
        cost = cost + charge if charge is not None else None
    record.cost = cost
    record.cost_source = "upstream" if cost is not None else None
    try:
        small_enough = len(orjson.dumps(usage)) <= MAX_USAGE_JSON_BYTES
    except TypeError:
        small_enough = False
    record.usage = usage if small_enough else {"truncated": True}
