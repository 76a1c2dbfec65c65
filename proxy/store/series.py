"""Spend over time: requests and cost per hour or day bucket, split by the top models (the rest as "other").

The dashboard's chart reads this, from the rollups where they hold every filter (usage.py), else from the
completions rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from . import usage
from .filters import Filters, where_clauses
from .models import completions_table
from .types import Money

c = completions_table.c
OTHER = "other"
UNKNOWN_MODEL = "(no model)"
_SQLITE_FORMAT = {"hour": "%Y-%m-%d %H:00:00", "day": "%Y-%m-%d 00:00:00"}


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    bucket: datetime  # start of the hour/day, UTC
    model: str  # top-N model name, or "other"
    requests: int
    cost: Decimal | None


def _bucket_expr(bucket: Literal["hour", "day"], dialect: str) -> Any:
    if dialect == "sqlite":
        return func.strftime(_SQLITE_FORMAT[bucket], c.started_at)
    return func.date_trunc(bucket, func.timezone("UTC", c.started_at))


def _as_utc(value: Any) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _add(left: Decimal | None, right: Decimal | None) -> Decimal | None:
    if left is None:
        return right
    return left if right is None else left + right


async def fetch_series(
    conn: AsyncConnection, filters: Filters, bucket: Literal["hour", "day"], top: int = 6
) -> list[SeriesPoint]:
    """Points ordered by bucket, then model in rank order ("other" last); the top models are those with the
    highest cost over the whole selection (then the most requests)."""
    if bucket not in _SQLITE_FORMAT:
        raise ValueError(f"bucket must be hour or day, got {bucket!r}")
    if usage.answerable(filters, (bucket, "model", "requested_model")):
        groups = [
            (
                usage.bucket_start(when, bucket),
                (model if model is not None else requested) or UNKNOWN_MODEL,
                found.requests,
                found.cost,
            )
            for (when, model, requested), found in (
                await usage.aggregate(conn, filters, (bucket, "model", "requested_model"))
            ).items()
            if found.requests
        ]
    else:
        groups = await _row_groups(conn, filters, bucket)
    return _top_models(groups, top)


async def _row_groups(
    conn: AsyncConnection, filters: Filters, bucket: Literal["hour", "day"]
) -> list[tuple[datetime, str, int, Decimal | None]]:
    dialect = conn.dialect.name
    moment = _bucket_expr(bucket, dialect).label("bucket")
    model = func.coalesce(c.model, c.requested_model).label("model")
    query = (
        select(moment, model, func.count().label("requests"), func.sum(c.cost, type_=Money()).label("cost"))
        .where(*where_clauses(filters, dialect))
        .group_by(moment, model)
    )
    return [
        (_as_utc(row.bucket), row.model or UNKNOWN_MODEL, row.requests, row.cost) for row in await conn.execute(query)
    ]


def _top_models(groups: list[tuple[datetime, str, int, Decimal | None]], top: int) -> list[SeriesPoint]:
    totals: dict[str, tuple[Decimal | None, int]] = {}
    for _, name, requests, cost in groups:
        spent, count = totals.get(name, (None, 0))
        totals[name] = (_add(spent, cost), count + requests)
    ranked = sorted(totals, key=lambda name: (totals[name][0] is None, -(totals[name][0] or 0), -totals[name][1], name))
    kept = {name: rank for rank, name in enumerate(ranked[:top])}
    merged: dict[tuple[datetime, str], tuple[int, Decimal | None]] = {}
    for moment_value, name, requests, cost in groups:
        label = name if name in kept else OTHER
        count, spent = merged.get((moment_value, label), (0, None))
        merged[(moment_value, label)] = (count + requests, _add(spent, cost))
    order = {**kept, OTHER: len(kept)}
    points = [SeriesPoint(when, label, count, spent) for (when, label), (count, spent) in merged.items()]
    points.sort(key=lambda point: (point.bucket, order[point.model]))
    return points
