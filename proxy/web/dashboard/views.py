"""The dashboard's pages: the overview of a period, the list of calls, one call in full.

Every read uses its own connection from the engine's pool (never the writer's); the overview's queries run
side by side, each on its own connection. Filters are the HTTP API's (store/filters.py), and the list
pages by id exactly as /_ledger/api/completions does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ...parse.record import APIS, OUTCOMES
from ...store import histogram
from ...store.filters import FilterError, Filters, parse_filters
from ...store.latency import fetch_percentiles
from ...store.models import ApiKey
from ...store.queries import COLUMNS, AmbiguousId, fetch_completion, fetch_completions, short_id, to_json
from ...store.retention import pruned_before, pruned_note, reaches_pruned
from ...store.series import fetch_series
from ...store.stats import StatsRow, fetch_stats
from ..appkeys import ENGINE
from .charts import bucket_for, build_chart
from .render import Params, filter_params, page, percent

DEFAULT_PERIOD = "7d"
PERIODS = ("24h", "7d", "30d", "90d")
TOP_ROWS = 10
PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
OVERVIEW_SLOTS = 2  # overviews computed at once per process; each runs its seven queries side by side
T = TypeVar("T")
SLOTS = web.AppKey("dashboard_overview_slots", asyncio.Semaphore)


def _parse(params: Params) -> Filters:
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        grouped.setdefault(name, []).append(value)
    return parse_filters(grouped)


async def _read(engine: AsyncEngine, query: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    async with engine.connect() as conn:
        return await query(conn)


def _form_context(params: Params, error: FilterError | None) -> dict[str, Any]:
    values: dict[str, str] = {}
    for name, value in params:
        if name != "tag":
            values.setdefault(name, value)
    return {
        "params": params,
        "values": values,
        "tags": [value for name, value in params if name == "tag"],
        "outcomes": OUTCOMES,
        "apis": APIS,
        "error": error,
    }


async def _bad_filter(
    request: web.Request, template: str, params: Params, error: FilterError, extra: dict[str, Any]
) -> web.Response:
    context = {"title": "Bad filter", **extra, **_form_context(params, error)}
    return await page(request, template, context, status=400)


def _top(rows: list[StatsRow], total: StatsRow, dimension: str) -> list[dict[str, Any]]:
    by_cost = total.cost is not None and total.cost > 0
    out = []
    for row in rows[:TOP_ROWS]:
        part = float(row.cost or 0) if by_cost else float(row.requests)
        whole = float(total.cost or 0) if by_cost else float(total.requests)
        name = row.label or row.key
        out.append(
            {
                "name": "(none)" if name is None else str(name),
                "param": None if row.key is None or dimension == "upstream" else dimension,
                "value": None if row.key is None else str(row.key),
                "fingerprint": row.key if dimension == "key" and row.label else None,
                "requests": row.requests,
                "errors": row.errors,
                "cost": row.cost,
                "share": round(percent(part, whole), 1),
            }
        )
    return out


def period_start(period: str, now: datetime) -> datetime:
    """Where a period link starts: "7d" is today and the six UTC days before it, "24h" this hour and the 23
    before it. Whole days and hours are read from the rollups alone, and the chart's buckets are whole."""
    count, unit = int(period[:-1]), timedelta(days=1) if period.endswith("d") else timedelta(hours=1)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((now - epoch) // unit - (count - 1)) * unit


async def overview(request: web.Request) -> web.Response:
    params = filter_params(request.query.items())
    now = datetime.now(UTC)
    if not any(name in ("since", "until") for name, _ in params):
        params = (("since", DEFAULT_PERIOD), *params)
    period = dict(params).get("since") if len(params) == 1 else None
    if period in PERIODS:
        start = period_start(period, now).isoformat()
        params = tuple((name, start if name == "since" else value) for name, value in params)
    try:
        filters = _parse(params)
    except FilterError as exc:
        return await _bad_filter(request, "overview.html", params, exc, {"periods": PERIODS, "period": None})
    engine = request.app[ENGINE]
    bucket = bucket_for(filters.since, filters.until, now)
    async with request.app[SLOTS]:
        by_model, by_key, by_user, by_tag, by_upstream, points, (p50, p95) = await asyncio.gather(
            _read(engine, lambda conn: fetch_stats(conn, "model", filters, percentiles=False)),
            _read(engine, lambda conn: fetch_stats(conn, "key", filters, percentiles=False)),
            _read(engine, lambda conn: fetch_stats(conn, "user", filters, percentiles=False)),
            _read(engine, lambda conn: fetch_stats(conn, "tag", filters, percentiles=False)),
            _read(engine, lambda conn: fetch_stats(conn, "upstream", filters, percentiles=False)),
            _read(engine, lambda conn: fetch_series(conn, filters, bucket)),
            _read(engine, lambda conn: fetch_percentiles(conn, filters)),
        )
    totals = by_model.totals
    tops = [
        ("Models", "model", _top(by_model.rows, totals, "model")),
        ("Keys", "key", _top(by_key.rows, totals, "key")),
        ("Users", "user", _top(by_user.rows, totals, "user")),
        ("Tags", "tag", _top(by_tag.rows, by_tag.totals, "tag")),
        ("Upstreams", "upstream", _top(by_upstream.rows, totals, "upstream")),
    ]
    context = {
        "title": "Overview",
        "periods": PERIODS,
        "period": period,
        "since": filters.since,
        "until": filters.until or now,
        "totals": totals,
        "p50": p50,
        "p95": p95,
        "percentiles": "exact" if by_model.percentiles == "exact" else histogram.RESOLUTION,
        "chart": build_chart(points, filters.since, filters.until or now, bucket),
        "tops": tops,
        **_form_context(params, None),
    }
    return await page(request, "overview.html", context)


def _page_size(raw: str | None) -> int:
    if raw is None or raw == "":
        return PAGE_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise FilterError("limit", f"expected an integer from 1 to {MAX_PAGE_SIZE}, got {raw!r}")
    return int(raw)


def _cursor(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or not 1 <= int(raw) < 2**63:
        raise FilterError("cursor", f"expected a row id, got {raw!r}")
    return int(raw)


def _list_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "request_id": row["request_id"],
        "short_id": short_id(row["request_id"]),
        "started_at": row["started_at"],
        "model": row["model"] or row["requested_model"],
        "status_code": row["status_code"],
        "outcome": row["outcome"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "cost": row["cost"],
        "finish": [str(ch["finish_reason"]) for ch in row["choices"] if ch["finish_reason"]],
        "user": row["user"],
        "stream": row["stream"],
    }


async def requests_list(request: web.Request) -> web.Response:
    params = filter_params(request.query.items())
    try:
        filters = _parse(params)
        limit = _page_size(request.query.get("limit"))
        cursor = _cursor(request.query.get("cursor"))
    except FilterError as exc:
        empty = {"rows": [], "next_cursor": None, "cursor": None, "pruned_note": None}
        return await _bad_filter(request, "requests.html", params, exc, empty)
    async with request.app[ENGINE].connect() as conn:
        rows = await fetch_completions(conn, filters, limit=limit + 1, before_id=cursor)
        horizon = await pruned_before(conn)
    next_cursor = str(rows[limit - 1]["id"]) if len(rows) > limit else None
    context = {
        "title": "Requests",
        "rows": [_list_row(row) for row in rows[:limit]],
        "next_cursor": next_cursor,
        # on the last page only: the list ends there because older calls were pruned
        "pruned_note": pruned_note(horizon) if not next_cursor and reaches_pruned(horizon, filters.since) else None,
        "cursor": cursor,
        "limit": limit if limit != PAGE_SIZE else None,
        **_form_context(params, None),
    }
    return await page(request, "requests.html", context)


def _display(name: str, value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, dict | list):
        return to_json(value).decode()
    return str(value)


async def detail(request: web.Request) -> web.Response:
    ident = request.match_info["request_id"]
    async with request.app[ENGINE].connect() as conn:
        try:
            rows = await fetch_completion(conn, ident)
        except AmbiguousId as exc:  # a short id or prefix of several calls: the page lists them
            rows = exc.rows
        label = None
        if len(rows) == 1 and rows[0]["api_key_hash"]:
            found = await conn.execute(select(ApiKey.label).where(ApiKey.api_key_hash == rows[0]["api_key_hash"]))
            label = found.scalar_one_or_none()
    if not rows:
        context = {"title": "Not found", "message": f"No call with request id {ident!r}.", "nav": True}
        return await page(request, "message.html", context, status=404)
    if len(rows) > 1:
        context = {"title": "Several calls match", "ident": ident, "rows": [_list_row(row) for row in rows[:100]]}
        return await page(request, "ambiguous.html", context, status=300)
    row = rows[0]
    columns = [(name, row[name], _display(name, row[name])) for name in COLUMNS if row[name] is not None]
    tags = row["tags"] if isinstance(row["tags"], dict) else {}
    usage = to_json(row["usage"], indent=True).decode() if row["usage"] is not None else None
    context = {
        "title": f"Call {short_id(row['request_id'])}",
        "row": row,
        "columns": columns,
        "choices": row["choices"],
        "tags": sorted((str(k), str(v)) for k, v in tags.items()),
        "key_label": label,
        "usage": usage,
        "model": row["model"] or row["requested_model"],
    }
    return await page(request, "detail.html", context)
