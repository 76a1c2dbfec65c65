"""Who may use the ledger's own endpoints (/_ledger/api/*, /_ledger/metrics).

Access needs `Authorization: Bearer <[admin] token>`, compared in constant time. Without a configured
token the endpoints refuse everyone (403), unless the server listens on loopback only. A wrong token,
a missing one and "no token configured" all get the same 403 and the same body, so a caller cannot tell
them apart.
"""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web
from aiohttp.typedefs import Handler

from ..config import Config
from .responses import api_error


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _forbidden() -> web.Response:
    return api_error(403, "forbidden: a valid admin token is required", "forbidden")


class AdminAuth:
    """Decides once, from the config, who may call the ledger's endpoints."""

    def __init__(self, config: Config) -> None:
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


def guarded(handler: Handler) -> Handler:
    """The handler, behind the app's AdminAuth."""

    async def checked(request: web.Request) -> web.StreamResponse:
        refusal = request.app[AUTH].refusal(request)
        return refusal if refusal is not None else await handler(request)

    return checked


AUTH = web.AppKey("admin_auth", AdminAuth)
