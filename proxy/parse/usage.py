"""Token usage objects of every API mapped onto the ledger's token columns (OpenAI's convention)."""

from __future__ import annotations

from typing import Any

import orjson

from .fields import as_amount, as_count, detail_count, first_count
from .record import CompletionRecord

MAX_USAGE_JSON_BYTES = 64 * 1024
_PROMPT_DETAILS = ("prompt_tokens_details", "input_tokens_details")
_COMPLETION_DETAILS = ("completion_tokens_details", "output_tokens_details")


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
    cost = as_amount(usage.get("cost"))
    record.cost = cost
    record.cost_source = "upstream" if cost is not None else None
    try:
        small_enough = len(orjson.dumps(usage)) <= MAX_USAGE_JSON_BYTES
    except TypeError:
        small_enough = False
    record.usage = usage if small_enough else {"truncated": True}

