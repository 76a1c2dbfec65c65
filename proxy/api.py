"""The ledger's own HTTP endpoints: the JSON query API under /_ledger/api/ and /_ledger/metrics.

Access needs `Authorization: Bearer <[admin] token>`, compared in constant time. Without a configured
token the endpoints refuse everyone (403), unless the server listens on loopback only. A wrong token
and "no token configured" get the same 403 and the same body, so a caller cannot tell them apart; a
request without credentials to a server that has a token gets 401.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .config import Config
from .keys import CONFIG, ENGINE, METRICS
from .metrics import CONTENT_TYPE
from .queries import FilterError, fetch_completion, fetch_completions, parse_filters, to_json
from .stats import fetch_stats, parse_dimension

API_PREFIX = "/_ledger/api/"
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=to_json(data), content_type="application/json")


def api_error(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    error: dict[str, Any] = {"message": message, "type": "invalid_request_error", "code": code}
    if param is not None:
        error["param"] = param
    return json_response({"error": error}, status)


def _forbidden() -> web.Response:
    return api_error(403, "forbidden: a valid admin token is required", "forbidden")


class AdminAuth:
    """Decides once, from the config, who may call the ledger's endpoints."""

    def __init__(self, config: Config) -> None:
        from .server import is_loopback  # server imports the app factory, which imports this module

        token = config.admin.token
        self._token = token.encode() if token else None
        self._open = self._token is None and is_loopback(config.server.host)
        self._decoy = b"\x00" * 32

    def refusal(self, request: web.Request) -> web.Response | None:
        """None when the request may proceed, else the response that refuses it."""
        if self._open:
            return None
        scheme, _, presented = request.headers.get("Authorization", "").strip().partition(" ")
        credentials = presented.strip().encode() if scheme.lower() == "bearer" else b""
        # every failure is the same 403, missing credentials included: a 401 only when a token is
        # configured would tell a prober whether one is
        matches = hmac.compare_digest(credentials, self._token or self._decoy)
        return None if matches and self._token is not None else _forbidden()


def _guarded(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        refusal = request.app[AUTH].refusal(request)
        return refusal if refusal is not None else await handler(request)

    return guarded


def _filters(request: web.Request, extra: tuple[str, ...]) -> Any:
    params = {name: request.query.getall(name) for name in request.query if name not in extra}
    return parse_filters(params)


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
    next_cursor = str(rows[limit - 1]["id"]) if len(rows) > limit else None
    return json_response({"data": rows[:limit], "next_cursor": next_cursor})


async def completion(request: web.Request) -> web.Response:
    ident = request.match_info["request_id"]
    async with request.app[ENGINE].connect() as conn:
        rows = await fetch_completion(conn, ident)
    if not rows:
        return api_error(404, f"no completion with request id {ident!r}", "not_found")
    return json_response(rows[0])


async def stats(request: web.Request) -> web.Response:
    try:
        by = parse_dimension(request.query.get("by", "model"))
        filters = _filters(request, ("by",))
    except FilterError as exc:
        return api_error(400, exc.message, "invalid_parameter", exc.param)
    async with request.app[ENGINE].connect() as conn:
        result = await fetch_stats(conn, by, filters)
    return json_response(
        {"by": result.by, "rows": [r.as_dict() for r in result.rows], "totals": result.totals.as_dict()}
    )


async def metrics(request: web.Request) -> web.Response:
    response = web.Response(body=request.app[METRICS].render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


AUTH = web.AppKey("admin_auth", AdminAuth)


def add_routes(app: web.Application) -> None:
    """Register the endpoints (before the /_ledger/ catch-all)."""
    app[AUTH] = AdminAuth(app[CONFIG])
    app.router.add_get("/_ledger/metrics", _guarded(metrics))
    app.router.add_get(API_PREFIX + "completions", _guarded(completions))
    app.router.add_get(API_PREFIX + "completions/{request_id}", _guarded(completion))
    app.router.add_get(API_PREFIX + "stats", _guarded(stats))
