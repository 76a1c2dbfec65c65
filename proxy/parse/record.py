"""What parsing produces: one CompletionRecord per proxied call, with a ChoiceRecord per choice.

A record's fields are the `completions` columns (proxy/store/models.py is the schema; proxy/store/rows.py
checks at import that the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

APIS = ("chat", "responses", "embeddings", "completions", "messages")  # completions.api values
# completions.outcome values (docs/reference/schema.md#outcomes says what each means)
OUTCOMES = ("ok", "upstream_error", "unreachable", "timeout", "client_disconnected", "unparsed", "rejected")

@dataclass(slots=True)
class ChoiceRecord:
    index: int
    finish_reason: str | None = None
    native_finish_reason: str | None = None
    role: str | None = None


@dataclass(slots=True)
class CompletionRecord:
    """Everything logged about one proxied call; its fields are the `completions` columns."""

    request_id: str
    started_at: datetime
    method: str
    path: str
    upstream: str
    duration_ms: float | None = None
    ttft_ms: float | None = None
    status_code: int | None = None
    outcome: str = "ok"
    stream: bool = False
    requested_model: str | None = None
    completion_id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None
    provider: str | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost: Decimal | None = None
    cost_source: str | None = None
    usage: dict[str, Any] | None = None
    api_key_hash: str | None = None
    user: str | None = None
    tags: dict[str, str] | None = None
    error: str | None = None
    upstream_request_id: str | None = None
    api: str | None = None  # the wire format parsed: chat, responses, embeddings, completions, messages
    choices: list[ChoiceRecord] = field(default_factory=list)
