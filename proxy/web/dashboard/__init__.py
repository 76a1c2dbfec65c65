"""The dashboard at /_ledger/: server-rendered HTML (Jinja2, autoescaped), charts as inline SVG, one
stylesheet; no script, nothing fetched from elsewhere.

- access.py     who sees the pages; the login form and the session cookie
- login_throttle.py  wrong tokens per client address, past which the login form answers 429
- views.py      the overview, the list of calls, one call
- charts.py     the spend chart's geometry
- render.py     templates, formatting, list URLs, safety headers
- templates/    the pages; static/ the stylesheet
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .access import LOGIN_PATH, login, login_form, logout, page_guarded
from .login_throttle import THROTTLE, LoginThrottle
from .render import LIST_PATH, PREFIX, stylesheet
from .views import OVERVIEW_SLOTS, SLOTS, detail, overview, requests_list


def add_routes(app: web.Application) -> None:
    """Register the pages (before the /_ledger/ catch-all; the app's AdminAuth must exist)."""
    app[SLOTS] = asyncio.Semaphore(OVERVIEW_SLOTS)
    app[THROTTLE] = LoginThrottle()
    app.router.add_get(PREFIX, page_guarded(overview))
    app.router.add_get(LIST_PATH, page_guarded(requests_list))
    app.router.add_get(LIST_PATH + "/{request_id}", page_guarded(detail))
    app.router.add_get(LOGIN_PATH, login_form)
    app.router.add_post(LOGIN_PATH, login)
    app.router.add_post(PREFIX + "logout", logout)
    app.router.add_get(PREFIX + "static/dashboard.css", stylesheet)
