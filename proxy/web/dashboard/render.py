"""Pages as responses: the Jinja environment (autoescaped), value formatting, URLs of filtered lists, and the
safety headers every dashboard response carries.

Templates render in a worker thread: a page's size is bounded, but the event loop also serves proxied
calls and should not wait on string building.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from ...store.filters import FILTER_PARAMS
from ..auth import AUTH

HERE = Path(__file__).parent
PREFIX = "/_ledger/"
LIST_PATH = PREFIX + "requests"
SAFETY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

Params = tuple[tuple[str, str], ...]


def filter_params(query: Mapping[str, Any] | Iterable[tuple[str, str]]) -> Params:
    """The non-empty filter parameters of a query string, in order (what a filtered list's URL carries)."""
    items = query.items() if isinstance(query, Mapping) else query
    return tuple((name, str(value)) for name, value in items if name in FILTER_PARAMS and value != "")


def list_url(params: Params, **change: str | None) -> str:
    """The list URL with `params`, each named parameter replaced (None removes it; `tag` is added to)."""
    kept = [(name, value) for name, value in params if name not in change or name == "tag"]
    for name, value in change.items():
        if value is not None and (name, value) not in kept:
            kept.append((name, value))
    return LIST_PATH + ("?" + urlencode(kept) if kept else "")


def filtered(params: Params, name: str, value: str) -> str:
    """The list narrowed by one more filter (a tag is added to the others; any other filter is replaced)."""
    return list_url(params, **{name: value})


def detail_url(request_id: str) -> str:
    return LIST_PATH + "/" + quote(request_id, safe="")


def money(value: Decimal | float | None) -> str:
    if value is None:
        return "-"
    amount = Decimal(str(value))
    if amount == 0:
        return "$0"
    if abs(amount) < Decimal("0.0001"):
        return f"${amount:.2e}"
    places = 2 if abs(amount) >= 100 else 4 if abs(amount) >= 1 else 6
    text = f"{amount:,.{places}f}".rstrip("0")
    return "$" + (text + "00" if text.endswith(".") else text)


def count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def millis(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:,.0f} ms"


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def percent(part: float, whole: float) -> float:
    return 0.0 if not whole else max(0.0, min(100.0, 100.0 * part / whole))


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(money=money, count=count, millis=millis, when=when)
    env.globals.update(list_url=list_url, filtered=filtered, detail_url=detail_url, prefix=PREFIX)
    return env


ENV = _environment()
STYLESHEET = (HERE / "static" / "dashboard.css").read_bytes()


def render(name: str, context: dict[str, Any]) -> str:
    return ENV.get_template(name).render(context)


def with_safety(response: web.StreamResponse, *, cache: bool = False) -> web.StreamResponse:
    response.headers.update(SAFETY_HEADERS)
    response.headers["Cache-Control"] = "public, max-age=3600" if cache else "no-store"
    return response


async def page(request: web.Request, name: str, context: dict[str, Any], status: int = 200) -> web.Response:
    """The rendered template with the safety headers; `logout` tells the header to offer signing out."""
    context = {"logout": request.app[AUTH].token_required, **context}
    text = await asyncio.get_running_loop().run_in_executor(None, partial(render, name, context))
    response = web.Response(status=status, text=text, content_type="text/html", charset="utf-8")
    with_safety(response)
    return response


def redirect(location: str) -> web.Response:
    response = web.Response(status=303, headers={"Location": location})
    with_safety(response)
    return response


async def stylesheet(request: web.Request) -> web.Response:
    response = web.Response(body=STYLESHEET, content_type="text/css", charset="utf-8")
    with_safety(response, cache=True)
    return response
