"""Where a call goes and what it speaks: the upstream (`[[routes]]` by path prefix, else upstream.url)
and the API its body is parsed as (from the method and path), both decided per call in a few string
operations."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from ..config import Config

# the last path segment of a POST that creates something billed, by API; chat is told apart first
_LAST_SEGMENT_APIS = {
    "/completions": "completions",
    "/responses": "responses",
    "/embeddings": "embeddings",
    "/messages": "messages",
}


def api_of(method: str, path: str) -> str | None:
    """The API a call is parsed as, or None (not logged unless all_paths).

    Only the creating POST itself: `/v1/responses/{id}` (retrieve, cancel), `/v1/messages/count_tokens`,
    `/v1/messages/batches` end in another segment. OpenAI's Assistants also POST to
    `/v1/threads/{id}/messages`: not an Anthropic message."""
    if method != "POST":
        return None
    if path[-17:] == "/chat/completions":
        return "chat"
    api = _LAST_SEGMENT_APIS.get(path[path.rfind("/") :])
    if api == "messages" and "/threads/" in path:
        return None
    return api


def client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    """No total: a stream may run for as long as the upstream keeps sending."""
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=read)


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    url: str
    timeout: aiohttp.ClientTimeout


class Routes:
    """The configured routes, and the default upstream for every other path."""

    __slots__ = ("default", "routes")

    def __init__(self, config: Config) -> None:
        upstream = config.upstream
        self.default = Route("", upstream.url, client_timeout(upstream.connect_timeout, upstream.read_timeout))
        self.routes = tuple(
            Route(
                route.prefix,
                route.url,
                client_timeout(
                    route.connect_timeout if route.connect_timeout is not None else upstream.connect_timeout,
                    route.read_timeout if route.read_timeout is not None else upstream.read_timeout,
                ),
            )
            for route in config.routes
        )

    def pick(self, target: str) -> tuple[Route, str]:
        """The route of a request target (path and query, as received) and the target to send it: the
        prefix removed. Prefixes match whole segments: `/openai` takes `/openai/v1/...`, not `/openaix`."""
        for route in self.routes:
            prefix = route.prefix
            if target.startswith(prefix):
                rest = target[len(prefix) :]
                if not rest:
                    return route, "/"
                if rest[0] == "/":
                    return route, rest
                if rest[0] == "?":
                    return route, "/" + rest
        return self.default, target
