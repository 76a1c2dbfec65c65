"""Re-pricing logged rows from the price book (`chatledger reprice`); upstream costs are never touched."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from ..models import completions_table
from ..rollup_write import add_sums
from ..rollups import DIMENSIONS, cost_changes
from .book import PriceBook


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
    "started_hour",
    *DIMENSIONS,
    "tags",
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
    effect then (`reprice --current`: a corrected price applies to the past too). The rollups' priced and
    cost_pusd move by each changed row's difference, in the transaction that changes the rows."""
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
            moved = []
            for row in rows:
                cost = book.cost_of(row, prices_at)
                report.rows_checked += 1
                report.total_before += row.cost or 0
                report.total_after += cost or 0
                report.unknown_before += row.cost is None
                report.unknown_after += cost is None
                if cost != row.cost:
                    moved.append((row, row.cost, cost))
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
                await add_sums(conn, cost_changes(moved))
