"""The JSON query API under /_ledger/api/ and /_ledger/metrics (access: auth.py)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..store.filters import FilterError, parse_filters
from ..store.queries import AmbiguousId, fetch_completion, fetch_completions
from ..store.retention import pruned_before
from ..store.stats import fetch_stats, parse_dimension
from .appkeys import CONFIG, ENGINE, METRICS
from .auth import AUTH, AdminAuth, guarded
from .metrics import CONTENT_TYPE
from .responses import api_error, json_response

API_PREFIX = "/_ledger/api/"
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


def _filters(request: web.Request, extra: tuple[str, ...]) -> Any:
    params = {name: request.query.getall(name) for name in request.query if name not in extra}
    return parse_filters(params)


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "").lower()
    if raw not in ("", "true", "false", "1", "0", "yes", "no"):
        raise FilterError(name, f"expected true or false, got {raw!r}")
    return raw in ("true", "1", "yes")


def _int_param(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise FilterError(name, f"expected an integer from {low} to {high}, got {raw!r}")
    return int(raw)


async def completions(request: web.Request) -> web.Response:
    """Newest first, keyset-paginated on id: a page never shifts when new rows arrive."""
    try:
        filters = _filters(request, ("limit", "cursor"))
        limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT) or DEFAULT_LIMIT
        cursor = _int_param(request, "cursor", None, 1, 2**63 - 1)
    except FilterError as exc:
        return api_error(400, exc.message, "invalid_parameter", exc.param)
    async with request.app[ENGINE].connect() as conn:
        rows = await fetch_completions(conn, filters, limit=limit + 1, before_id=cursor)
        horizon = await pruned_before(conn)
    next_cursor = str(rows[limit - 1]["id"]) if len(rows) > limit else None
    return json_response({"data": rows[:limit], "next_cursor": next_cursor, "pruned_before": horizon})


async def completion(request: web.Request) -> web.Response:
    ident = request.match_info["request_id"]
    try:
        async with request.app[ENGINE].connect() as conn:
            rows = await fetch_completion(conn, ident)
    except AmbiguousId as exc:
        message = f"{ident!r} matches {len(exc.request_ids)} request ids; give more characters"
        return api_error(409, message, "ambiguous")
    if not rows:
        return api_error(404, f"no completion with request id {ident!r}", "not_found")
    return json_response(rows[0])


async def stats(request: web.Request) -> web.Response:
    try:
        by = parse_dimension(request.query.get("by", "model"))
        exact = _flag(request, "exact")
        filters = _filters(request, ("by", "exact"))
    except FilterError as exc:
        return api_error(400, exc.message, "invalid_parameter", exc.param)
    async with request.app[ENGINE].connect() as conn:
        result = await fetch_stats(conn, by, filters, exact=exact)
    return json_response(result.as_dict())


async def metrics(request: web.Request) -> web.Response:
    response = web.Response(body=request.app[METRICS].render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


def add_routes(app: web.Application) -> None:
    """Register the endpoints (before the /_ledger/ catch-all)."""
    app[AUTH] = AdminAuth(app[CONFIG])
    app.router.add_get("/_ledger/metrics", guarded(metrics))
    app.router.add_get(API_PREFIX + "completions", guarded(completions))
    app.router.add_get(API_PREFIX + "completions/{request_id}", guarded(completion))
    app.router.add_get(API_PREFIX + "stats", guarded(stats))
