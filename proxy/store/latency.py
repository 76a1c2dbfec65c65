"""Duration percentiles (p50, p95) over a whole selection, for headline numbers.

stats.py computes them per group; this is the same interpolated percentile (percentile_cont) over every
selected row at once. SQLite has no percentile function: the two durations around each wanted rank are
read with ORDER BY ... LIMIT 2 OFFSET k, from the nearer end.
"""

from __future__ import annotations

from sqlalchemy import desc, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from . import usage
from .filters import Filters, where_clauses
from .models import completions_table

c = completions_table.c
PERCENTILES = (0.5, 0.95)


async def fetch_percentiles(
    conn: AsyncConnection, filters: Filters, *, exact: bool = False
) -> tuple[float | None, float | None]:
    """p50 and p95 of the selection's durations: from the rollups' histograms where they hold every filter
    (within histogram.RESOLUTION), else, or with `exact`, from the rows."""
    if not exact and usage.answerable(filters, ()):
        everything = usage.Aggregate()
        for found in (await usage.aggregate(conn, filters, ())).values():
            everything.merge(found)
        return everything.percentile(PERCENTILES[0]), everything.percentile(PERCENTILES[1])
    where = [*where_clauses(filters, conn.dialect.name), c.duration_ms.is_not(None)]
    if conn.dialect.name != "sqlite":
        query = select(*(func.percentile_cont(p).within_group(c.duration_ms) for p in PERCENTILES)).where(*where)
        p50, p95 = (await conn.execute(query)).one()
        return p50, p95
    count = (await conn.execute(select(func.count()).where(*where))).scalar_one()
    if not count:
        return None, None
    found = []
    for p in PERCENTILES:
        h = p * (count - 1)
        low = int(h)
        from_top = low > count // 2 and count - 2 - low >= 0
        order = desc(c.duration_ms) if from_top else c.duration_ms
        offset = count - 2 - low if from_top else low
        query = select(c.duration_ms).where(*where).order_by(order).limit(2).offset(offset)
        values = sorted((await conn.execute(query)).scalars())
        lower, upper = values[0], values[-1]
        found.append(lower + (h - low) * (upper - lower))
    return found[0], found[1]
