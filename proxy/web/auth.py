"""Who may use the ledger's own endpoints (/_ledger/api/*, /_ledger/metrics, the dashboard).

With `[admin] token` set: `Authorization: Bearer <token>` (compared in constant time), or the dashboard's
session cookie, which the login form sets: an expiry and an HMAC of it under a key derived from the token
(changing the token ends every session). A wrong token, a missing one and "no token configured" all get
the same 403 and the same body, so a caller cannot tell them apart.

Without a token, only a server listening on loopback answers, and only to requests whose Host header
names a loopback host: a web page the browser loaded from elsewhere can point its own name at 127.0.0.1
(DNS rebinding), but its requests still carry that name as Host.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from ..config import Config
from .responses import api_error

SESSION_COOKIE = "chatledger_session"
SESSION_SECONDS = 12 * 3600
_SESSION_CONTEXT = b"chatledger dashboard session v1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_is_loopback(header: str | None) -> bool:
    """Whether a Host header names a loopback host: localhost, 127.0.0.0/8 or [::1], with or without port."""
    if not header:
        return False
    host = header.strip().lower()
    port = ""
    if host.startswith("["):
        name, bracket, port = host[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        port = port[1:]
        try:
            address = ipaddress.IPv6Address(name)
        except ValueError:
            return False
        loopback = address.is_loopback
    else:
        name, _, port = host.partition(":")
        if ":" in port:  # an IPv6 address without brackets is not a Host
            return False
        loopback = is_loopback(name)
    if port and not (port.isdigit() and len(port) <= 5):
        return False
    return loopback


def _forbidden() -> web.Response:
    return api_error(403, "forbidden: a valid admin token is required", "forbidden")


class AdminAuth:
    """Decides, from the config and each request, who may call the ledger's endpoints."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        token = config.admin.token
        self._token = token.encode() if token else None
        self._loopback_only = self._token is None and is_loopback(config.server.host)
        self._decoy = b"\x00" * 32
        secret = self._token or self._decoy
        self._session_key = hmac.new(secret, _SESSION_CONTEXT, hashlib.sha256).digest()
        self._clock = clock

    @property
    def token_required(self) -> bool:
        return self._token is not None

    def token_matches(self, presented: str) -> bool:
        matches = hmac.compare_digest(presented.strip().encode(), self._token or self._decoy)
        return matches and self._token is not None

    def allows(self, request: web.Request) -> bool:
        if self._loopback_only:
            return host_is_loopback(request.headers.get("Host"))
        scheme, _, presented = request.headers.get("Authorization", "").strip().partition(" ")
        # every failure is the same 403, missing credentials included: a 401 only when a token is
        # configured would tell a prober whether one is
        if self.token_matches(presented if scheme.lower() == "bearer" else ""):
            return True
        return self.session_valid(request.cookies.get(SESSION_COOKIE, ""))

    def refusal(self, request: web.Request) -> web.Response | None:
        """None when the request may proceed, else the JSON response that refuses it."""
        return None if self.allows(request) else _forbidden()

    def new_session(self) -> str:
        """A cookie value: `<expiry unix seconds>.<hex HMAC of it>`."""
        expires = str(int(self._clock()) + SESSION_SECONDS)
        return f"{expires}.{self._sign(expires)}"

    def session_valid(self, value: str) -> bool:
        expires, dot, signature = value.partition(".")
        if self._token is None or not dot or not expires.isdigit() or len(expires) > 12:
            return False
        if not hmac.compare_digest(signature.encode(), self._sign(expires).encode()):
            return False
        return self._clock() < int(expires) <= self._clock() + SESSION_SECONDS + 60

    def _sign(self, expires: str) -> str:
        return hmac.new(self._session_key, expires.encode(), hashlib.sha256).hexdigest()


def guarded(handler: Handler) -> Handler:
    """The handler, behind the app's AdminAuth."""

    async def checked(request: web.Request) -> web.StreamResponse:
        refusal = request.app[AUTH].refusal(request)
        return refusal if refusal is not None else await handler(request)

    return checked


AUTH = web.AppKey("admin_auth", AdminAuth)
