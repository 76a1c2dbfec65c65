"""Prices and cost: which price applies to a logged call, and what the call cost.

The first half is pure code: a `PriceBook` built from price rows answers "what did model M cost at
time T", and `compute_cost` turns token counts into exact USD. The second half moves prices between
the config, OpenRouter's models list and the `prices` table, and re-prices logged rows.

Token conventions (OpenAI/OpenRouter): `prompt_tokens` includes cached and cache-write tokens, and
`completion_tokens` includes reasoning tokens. So cached tokens are billed at the cache-read rate
instead of the prompt rate (not on top of it), and reasoning tokens move from the completion rate to
the reasoning rate only when a model prices them separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .completions import CompletionRecord
from .config import ModelPrice
from .db import COST_SCALE, Price, completions_table

log = logging.getLogger(__name__)

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
) -> Decimal | None:
    """Exact USD for one call, or None when the token counts are unknown (never a guessed 0)."""
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


def _source_rank(source: str) -> int:
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
            best = min(_source_rank(entry.source) for entry in found)
            chosen = sorted(
                (e for e in found if _source_rank(e.source) == best), key=lambda e: e.effective_from
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
        )

    def apply(self, records: Sequence[CompletionRecord]) -> None:
        """Fill in cost for records the upstream did not price (the writer calls this before inserting)."""
        for record in records:
            if record.cost is not None or record.cost_source is not None:
                continue
            cost = self.cost_of(record)
            if cost is not None:
                record.cost, record.cost_source = cost, "pricing"


# ---- OpenRouter's models list (pure) -----------------------------------------------------------


def _per_million(value: Any) -> Decimal | None:
    """USD per token as OpenRouter writes it ("0.0000025") → USD per million; None if absent or negative."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0:
        return None  # "-1" marks variable pricing (openrouter/auto)
    return (amount * PER_MILLION).normalize() + 0


def parse_openrouter_models(payload: Any) -> dict[str, ModelPrice]:
    """`GET /api/v1/models` → {model id: price}. Optional rates of 0 mean "not priced separately"."""
    models: dict[str, ModelPrice] = {}
    data = payload.get("data") if isinstance(payload, dict) else None
    for item in data if isinstance(data, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
            continue
        pricing = item.get("pricing")
        if not isinstance(pricing, dict):
            continue
        prompt, completion = _per_million(pricing.get("prompt")), _per_million(pricing.get("completion"))
        if prompt is None or completion is None:
            continue
        optional = {
            name: _per_million(pricing.get(key))
            for name, key in (
                ("cache_read", "input_cache_read"),
                ("cache_write", "input_cache_write"),
                ("reasoning", "internal_reasoning"),
            )
        }
        models[item["id"]] = ModelPrice(
            prompt, completion, **{name: (rate if rate else None) for name, rate in optional.items()}
        )
    return models


# ---- the prices table ---------------------------------------------------------------------------


def _entry(price: Price) -> PriceEntry:
    return PriceEntry(
        price.model,
        price.effective_from,
        price.prompt,
        price.completion,
        price.cache_read,
        price.cache_write,
        price.reasoning,
        price.source,
    )


async def load_entries(conn: AsyncConnection) -> list[PriceEntry]:
    rows = await conn.execute(select(Price.__table__).order_by(Price.model, Price.effective_from))
    return [_entry(row) for row in rows]  # type: ignore[arg-type]


async def load_price_book(conn: AsyncConnection) -> PriceBook:
    return PriceBook(await load_entries(conn))


async def current_prices(conn: AsyncConnection, *, history: bool = False) -> list[PriceEntry]:
    """The latest entry per (model, source), or every entry with history=True."""
    entries = await load_entries(conn)
    if history:
        return entries
    latest: dict[tuple[str, str], PriceEntry] = {}
    for entry in entries:
        latest[(entry.model, entry.source)] = entry
    return sorted(latest.values(), key=lambda e: (e.model, _source_rank(e.source)))


def _rates(price: ModelPrice | PriceEntry) -> tuple[Decimal | None, ...]:
    return tuple(getattr(price, name) for name in RATE_FIELDS)


async def store_prices(
    conn: AsyncConnection, prices: Mapping[str, ModelPrice], source: str, now: datetime | None = None
) -> tuple[int, int]:
    """Insert the prices that differ from the latest entry of the same model and source.

    Returns (new models, changed models). Unchanged prices add nothing, so restarts are idempotent."""
    now = now or datetime.now(UTC)
    latest: dict[str, PriceEntry] = {}
    for entry in await load_entries(conn):
        if entry.source == source:
            latest[entry.model] = entry
    rows, new, changed = [], 0, 0
    for model, price in prices.items():
        previous = latest.get(model)
        if previous is not None and _rates(previous) == _rates(price):
            continue
        new, changed = (new + 1, changed) if previous is None else (new, changed + 1)
        rows.append(
            {
                "model": model,
                "effective_from": now,
                "source": source,
                **{name: getattr(price, name) for name in RATE_FIELDS},
            }
        )
    if rows:
        await conn.execute(Price.__table__.insert(), rows)
    return new, changed


async def fetch_openrouter_prices(url: str, seconds: float = 30.0) -> dict[str, ModelPrice]:
    """Fetch `<url>/api/v1/models` (OpenRouter's format) and parse the prices."""
    import aiohttp

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds), trust_env=False) as session,
        session.get(url.rstrip("/") + "/api/v1/models", headers={"Accept": "application/json"}) as response,
    ):
        if response.status != 200:
            raise RuntimeError(f"GET {response.url} answered HTTP {response.status}")
        payload = await response.json(content_type=None)
    prices = parse_openrouter_models(payload)
    if not prices:
        raise RuntimeError(f"{url}/api/v1/models returned no priced models")
    return prices


# ---- re-pricing logged rows ---------------------------------------------------------------------


@dataclass(slots=True)
class RepriceReport:
    rows_checked: int = 0
    rows_changed: int = 0
    total_before: Decimal = Decimal(0)
    total_after: Decimal = Decimal(0)
    unknown_before: int = 0
    unknown_after: int = 0


REPRICE_COLUMNS = (
    "id",
    "model",
    "requested_model",
    "started_at",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost",
)
_reprice_update = (
    update(completions_table)
    .where(completions_table.c.id == bindparam("row_id"))
    .values(cost=bindparam("new_cost"), cost_source=bindparam("new_source"))
)


async def reprice(
    engine: AsyncEngine,
    book: PriceBook,
    since: datetime | None,
    until: datetime | None,
    *,
    dry_run: bool = False,
    prices_at: datetime | None = None,
    batch: int = 2000,
) -> RepriceReport:
    """Recompute `pricing` costs (and unknown ones) from the price book; upstream costs are never touched.

    Each row is priced at the price in effect when it started, or, with `prices_at`, at the prices in
    effect then (`reprice --current`: a corrected price applies to the past too)."""
    table = completions_table
    where = [or_(table.c.cost_source.is_(None), table.c.cost_source == "pricing")]
    if since is not None:
        where.append(table.c.started_at >= since)
    if until is not None:
        where.append(table.c.started_at < until)
    report = RepriceReport()
    last_id = 0
    while True:
        async with engine.begin() as conn:
            rows = (
                await conn.execute(
                    select(*(table.c[name] for name in REPRICE_COLUMNS))
                    .where(*where, table.c.id > last_id)
                    .order_by(table.c.id)
                    .limit(batch)
                )
            ).all()
            if not rows:
                return report
            last_id = rows[-1].id
            changes = []
            for row in rows:
                cost = book.cost_of(row, prices_at)
                report.rows_checked += 1
                report.total_before += row.cost or 0
                report.total_after += cost or 0
                report.unknown_before += row.cost is None
                report.unknown_after += cost is None
                if cost != row.cost:
                    changes.append(
                        {
                            "row_id": row.id,
                            "new_cost": cost,
                            "new_source": "pricing" if cost is not None else None,
                        }
                    )
            report.rows_changed += len(changes)
            if changes and not dry_run:
                await conn.execute(_reprice_update, changes)


# ---- the running proxy's price book -------------------------------------------------------------


class Pricer:
    """Holds the proxy's price book: config prices recorded and the book loaded at start, then reloaded
    every `interval` seconds (prices synced by `chatledger prices sync` reach a running proxy)."""

    def __init__(self, engine: AsyncEngine, config_prices: Mapping[str, ModelPrice], interval: float = 60.0):
        self._engine = engine
        self._config_prices = dict(config_prices)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._config_recorded = False
        self.book = PriceBook(
            PriceEntry(model, datetime.min.replace(tzinfo=UTC), **{n: getattr(p, n) for n in RATE_FIELDS})
            for model, p in self._config_prices.items()
        )

    async def start(self, wait_seconds: float = 5.0) -> None:
        """Load prices, but never hold up the proxy's start for long: a slow database is retried later."""
        try:
            await asyncio.wait_for(self.refresh(), wait_seconds)
        except TimeoutError:
            log.warning("loading prices took over %.0fs; starting with the config's prices", wait_seconds)
        self._task = asyncio.create_task(self._run(), name="chatledger-prices")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        """Record config prices (once) and reload the book; on a database error keep the current book."""
        try:
            async with self._engine.begin() as conn:
                if not self._config_recorded:
                    new, changed = await store_prices(conn, self._config_prices, "config")
                    if new or changed:
                        log.info("recorded %d new and %d changed price(s) from the config", new, changed)
                    self._config_recorded = True
                self.book = await load_price_book(conn)
        except Exception as exc:
            log.warning(
                "could not load prices from the database (%s: %s); keeping %d known price(s)",
                type(exc).__name__,
                exc,
                len(self.book),
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.refresh(), self._interval)

    def apply(self, records: Sequence[CompletionRecord]) -> None:
        self.book.apply(records)
