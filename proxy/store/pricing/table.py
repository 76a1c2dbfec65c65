"""The `prices` table: price entries loaded, listed and recorded (only when they change)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ...config import ModelPrice
from ..models import Price
from .book import RATE_FIELDS, PriceBook, PriceEntry, source_rank


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
    return sorted(latest.values(), key=lambda e: (e.model, source_rank(e.source)))


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
