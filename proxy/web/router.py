"""The proxy's router: aiohttp's, with two shortcuts taken before its lookup.

- A target no route can match gets the forwarder's 400: CONNECT (authority form), `*` (asterisk form) and
  `http://host/...` (absolute form), so the proxy is visibly not an open proxy (aiohttp would answer 404).
- A path outside LEDGER_PREFIX goes straight to the forwarding route, the one route it can match.

Both could be had from a middleware and the catch-all route alone, at a price every call pays: aiohttp
then runs its middleware machinery for each request, and its lookup walks the path's prefixes and runs
the catch-all's regex (docs/performance.md has the instruction counts).

aiohttp deprecates passing a router to Application (aio-libs/aiohttp#3021: custom routers should be
UrlDispatchers), which this is; `new_app` silences that warning, and pyproject keeps aiohttp below 4.
"""

from __future__ import annotations

import warnings
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

LEDGER_PREFIX = "/_ledger/"


class ProxyRouter(web.UrlDispatcher):
    def __init__(self, refuse: Handler) -> None:
        super().__init__()
        self._refusal = web.PlainResource("").add_route("*", refuse)
        self._forwarding: web.AbstractRoute | None = None

    def add_forwarding(self, handler: Handler) -> web.AbstractRoute:
        """The catch-all route: every path outside LEDGER_PREFIX."""
        self._forwarding = self.add_route("*", "/{tail:.*}", handler)
        return self._forwarding

    async def resolve(self, request: web.Request) -> web.UrlMappingMatchInfo:
        if request.raw_path[:1] != "/" or request.method == "CONNECT":
            return web.UrlMappingMatchInfo({}, self._refusal)
        path = request.path  # decoded, as aiohttp's lookup sees it: /%5Fledger/ is the ledger's too
        if self._forwarding is not None and path[: len(LEDGER_PREFIX)] != LEDGER_PREFIX:
            return web.UrlMappingMatchInfo({"tail": path[1:]}, self._forwarding)
        return await super().resolve(request)


def new_app(router: ProxyRouter, **kwargs: Any) -> web.Application:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "router argument is deprecated", DeprecationWarning)
        return web.Application(router=router, **kwargs)
