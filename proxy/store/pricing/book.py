"""Prices and cost, pure code: which price applies to a call, and what the call cost.

A `PriceBook` built from price entries answers "what did model M cost at time T", and `compute_cost`
turns token counts into exact USD.

Token conventions (OpenAI's, which the parsers apply to every API, Anthropic's included): `prompt_tokens`
includes cached and cache-write tokens, and `completion_tokens` includes reasoning tokens. So cached
tokens are billed at the cache-read rate instead of the prompt rate (not on top of it), and reasoning
tokens move from the completion rate to the reasoning rate only when a model prices them separately.
Embeddings generate nothing: their input is billed at the prompt rate alone.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import Any

from ...config import ModelPrice
from ...parse import CompletionRecord
from ..types import COST_SCALE

PER_MILLION = Decimal(1_000_000)
COST_QUANTUM = Decimal(1).scaleb(-COST_SCALE)
GLOB_CHARS = frozenset("*?[")
SOURCE_PRECEDENCE = ("config", "openrouter")  # a pattern priced in the config ignores synced prices
RATE_FIELDS = ("prompt", "completion", "cache_read", "cache_write", "reasoning")
RESOLVE_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class PriceEntry:
    """One row of the `prices` table: USD per million tokens for `model` (a name or a glob) from a time on."""

    model: str
    effective_from: datetime
    prompt: Decimal
    completion: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    source: str = "config"


def is_glob(pattern: str) -> bool:
    return not GLOB_CHARS.isdisjoint(pattern)


def compute_cost(
    price: PriceEntry | ModelPrice,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    cached_tokens: int | None = None,
    cache_write_tokens: int | None = None,
    reasoning_tokens: int | None = None,
    *,
    input_only: bool = False,
) -> Decimal | None:
    """Exact USD for one call, or None when the token counts are unknown (never a guessed 0).

    input_only: a call with no output (embeddings), priced from its prompt tokens alone."""
    if input_only and completion_tokens is None:
        completion_tokens = 0
    if prompt_tokens is None or completion_tokens is None:
        return None
    cached = min(cached_tokens or 0, prompt_tokens)
    written = min(cache_write_tokens or 0, prompt_tokens - cached) if price.cache_write is not None else 0
    total = (prompt_tokens - cached - written) * price.prompt
    total += cached * (price.cache_read if price.cache_read is not None else price.prompt)
    if written:
        total += written * price.cache_write  # type: ignore[operator]
    reasoning = min(reasoning_tokens or 0, completion_tokens) if price.reasoning is not None else 0
    total += (completion_tokens - reasoning) * price.completion
    if reasoning:
        total += reasoning * price.reasoning  # type: ignore[operator]
    return (total / PER_MILLION).quantize(COST_QUANTUM).normalize() + 0


@dataclass(slots=True)
class _History:
    """The price entries of one pattern, oldest first (one source: the one that takes precedence)."""

    starts: list[datetime] = field(default_factory=list)
    entries: list[PriceEntry] = field(default_factory=list)

    def at(self, when: datetime) -> PriceEntry:
        """The price in effect at `when`; before the first entry, the first entry (best known estimate)."""
        position = bisect_right(self.starts, when) - 1
        return self.entries[max(position, 0)]


def source_rank(source: str) -> int:
    return SOURCE_PRECEDENCE.index(source) if source in SOURCE_PRECEDENCE else len(SOURCE_PRECEDENCE)


class PriceBook:
    """Resolves a model name to a price history: exact name, then globs (longest pattern wins), then
    with a provider prefix stripped (`openai/gpt-4o` → `gpt-4o`), then with one added (a call logged as
    `gpt-4o` uses an `openai/gpt-4o` entry; when several providers match, the alphabetically first)."""

    def __init__(self, entries: Iterable[PriceEntry] = ()) -> None:
        by_pattern: dict[str, list[PriceEntry]] = {}
        for entry in entries:
            by_pattern.setdefault(entry.model, []).append(entry)
        self._exact: dict[str, _History] = {}
        globs: list[tuple[str, _History]] = []
        self._prefixed: dict[str, str] = {}
        for pattern, found in by_pattern.items():
            best = min(source_rank(entry.source) for entry in found)
            chosen = sorted(
                (e for e in found if source_rank(e.source) == best), key=lambda e: e.effective_from
            )
            history = _History([e.effective_from for e in chosen], chosen)
            if is_glob(pattern):
                globs.append((pattern, history))
                continue
            self._exact[pattern] = history
            if "/" in pattern:
                bare = pattern.split("/", 1)[1]
                if bare not in self._prefixed or pattern < self._prefixed[bare]:
                    self._prefixed[bare] = pattern
        self._globs = sorted(globs, key=lambda item: (-len(item[0]), item[0]))
        self._resolved: dict[str, _History | None] = {}
        self.size = sum(len(found) for found in by_pattern.values())

    def __len__(self) -> int:
        return self.size

    def _direct(self, name: str) -> _History | None:
        history = self._exact.get(name)
        if history is not None:
            return history
        for pattern, candidate in self._globs:
            if fnmatchcase(name, pattern):
                return candidate
        return None

    def resolve(self, model: str) -> _History | None:
        if model in self._resolved:
            return self._resolved[model]
        history = self._direct(model)
        name = model
        while history is None and "/" in name:
            name = name.split("/", 1)[1]
            history = self._direct(name)
        if history is None and "/" not in model and model in self._prefixed:
            history = self._exact[self._prefixed[model]]
        if len(self._resolved) >= RESOLVE_CACHE_MAX:
            self._resolved.clear()
        self._resolved[model] = history
        return history

    def price_for(self, model: str | None, requested_model: str | None, when: datetime) -> PriceEntry | None:
        """The price of the model the upstream reported, else of the model the client asked for."""
        for name in (model, requested_model):
            if name:
                history = self.resolve(name)
                if history is not None:
                    return history.at(when)
        return None

    def cost_of(self, row: Any, when: datetime | None = None) -> Decimal | None:
        """Cost of a record or row (anything with the completions columns as attributes), at the prices in
        effect when it started, or at `when`."""
        price = self.price_for(row.model, row.requested_model, when or row.started_at)
        if price is None:
            return None
        return compute_cost(
            price,
            row.prompt_tokens,
            row.completion_tokens,
            row.cached_tokens,
            row.cache_write_tokens,
            row.reasoning_tokens,
            input_only=getattr(row, "api", None) == "embeddings",
        )

    def apply(self, records: Sequence[CompletionRecord]) -> None:
        """Fill in cost for records the upstream did not price (the writer calls this before inserting)."""
        for record in records:
            if record.cost is not None or record.cost_source is not None:
                continue
            cost = self.cost_of(record)
            if cost is not None:
                record.cost, record.cost_source = cost, "pricing"
