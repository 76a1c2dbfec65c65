"""Who sees the dashboard, and the login form that sets the session cookie (rules in web/auth.py).

A page refused for want of a session redirects to the login form when a token is configured; otherwise
(no token: a non-loopback listener, or a Host that is not a loopback name) it answers 403.
"""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Handler

from ..auth import AUTH, SESSION_COOKIE, SESSION_SECONDS
from .login_throttle import THROTTLE, client_address
from .render import PREFIX, page, redirect

LOGIN_PATH = PREFIX + "login"
MAX_FORM_BYTES = 4096


def _safe_next(value: str | None) -> str:
    """Where to go after login: a dashboard path only (never another site, never a scheme)."""
    if not value or not value.startswith(PREFIX) or "//" in value or "\\" in value or len(value) > 2000:
        return PREFIX
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in value):
        return PREFIX
    return value


async def forbidden(request: web.Request) -> web.Response:
    return await page(request, "message.html", {"title": "Forbidden", "message": _FORBIDDEN, "nav": False}, status=403)


_FORBIDDEN = (
    "The dashboard answers on a loopback address to a loopback host name (localhost, 127.0.0.1, [::1]), "
    "or to anyone with the admin token when [admin] token is set."
)


def page_guarded(handler: Handler) -> Handler:
    async def checked(request: web.Request) -> web.StreamResponse:
        auth = request.app[AUTH]
        if auth.allows(request):
            return await handler(request)
        if auth.token_required:
            target = request.path_qs if request.method == "GET" else PREFIX
            return redirect(LOGIN_PATH + "?" + urlencode({"next": _safe_next(target)}))
        return await forbidden(request)

    return checked


async def login_form(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    auth = request.app[AUTH]
    if not auth.token_required and not auth.allows(request):
        return await forbidden(request)
    context = {
        "title": "Sign in",
        "nav": False,
        "token_required": auth.token_required,
        "next": _safe_next(request.query.get("next")),
        "error": error,
    }
    return await page(request, "login.html", context, status=status)


async def login(request: web.Request) -> web.StreamResponse:
    auth = request.app[AUTH]
    if not auth.token_required:
        return redirect(PREFIX) if auth.allows(request) else await forbidden(request)
    if request.content_length is None or request.content_length > MAX_FORM_BYTES:
        return await login_form(request, "The form is too large.", status=413)
    throttle, address = request.app[THROTTLE], client_address(request)
    wait = throttle.retry_after(address)
    if wait:  # checked before the token, so a right guess in the penalty window does not tell
        response = await login_form(request, f"Too many wrong tokens: try again in {wait} s.", status=429)
        response.headers["Retry-After"] = str(wait)
        return response
    form = await request.post()
    token, target = form.get("token"), form.get("next")
    if not isinstance(token, str) or not auth.token_matches(token):
        throttle.failed(address)
        return await login_form(request, "That token is not the admin token.", status=403)
    throttle.succeeded(address)
    response = redirect(_safe_next(target if isinstance(target, str) else None))
    response.set_cookie(
        SESSION_COOKIE,
        auth.new_session(),
        max_age=SESSION_SECONDS,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    response = redirect(LOGIN_PATH if request.app[AUTH].token_required else PREFIX)
    response.del_cookie(SESSION_COOKIE, path=PREFIX, httponly=True, samesite="Strict", secure=request.secure)
    return response
