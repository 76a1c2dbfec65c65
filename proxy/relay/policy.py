"""What may pass the proxy: the header policy in both directions, and which request targets it refuses.

Hop-by-hop headers (RFC 9110 7.6.1, and any named in `Connection`), `Host` and the proxy's own
`X-Ledger-*` headers are not forwarded; everything else is. Only the configured upstream is reachable:
absolute-form targets, CONNECT and host-steering headers are refused.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from multidict import CIMultiDict

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_FORWARDED_REQUEST = HOP_BY_HOP | {"host", "content-length"}
NOT_FORWARDED_RESPONSE = HOP_BY_HOP
STEERING_HEADERS = frozenset(
    {
        "x-forwarded-host",
        "x-forwarded-server",
        "x-original-host",
        "x-host",
        "x-original-url",
        "x-rewrite-url",
        "x-http-host-override",
    }
)


def _connection_named(headers: Any) -> frozenset[str]:
    """Header names listed in `Connection` (hop-by-hop by declaration, RFC 9110 7.6.1)."""
    names = set()
    for value in headers.getall("Connection", ()):
        if value in CONNECTION_OPTIONS:  # the usual `keep-alive` or `close`, nothing to split
            continue
        for part in value.split(","):
            name = part.strip().lower()
            if name not in CONNECTION_OPTIONS:
                names.add(name)
    return frozenset(names)


CONNECTION_OPTIONS = frozenset({"keep-alive", "close", "Keep-Alive", "Close", ""})  # the usual values name no header


# Headers that need a look at each one: the fast paths below apply only when none of these is present.
UNUSUAL_REQUEST_HEADERS = (HOP_BY_HOP - {"connection"}) | STEERING_HEADERS | {"forwarded"}
UNUSUAL_RESPONSE_HEADERS = HOP_BY_HOP - {"connection", "keep-alive", "transfer-encoding"}
DROPPED_REQUEST_HEADERS = frozenset({"host", "content-length", "connection"})
DROPPED_RESPONSE_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding"})
FEW_HEADERS = 8


def _fast_copy(
    headers: Any, unusual: frozenset[str], dropped: frozenset[str]
) -> tuple[CIMultiDict[str] | None, str]:
    """(a copy of the headers without the `dropped` names, their lowercased names joined by newlines), or
    (None, "") when the headers need the one-at-a-time filter: fewer than FEW_HEADERS (the loop costs
    less), an `unusual` name, or a Connection header naming others. The names are lowercased and checked
    as one set, and the copy is made in C, instead of a Python loop over every header (an SDK sends
    fifteen or more)."""
    if len(headers) < FEW_HEADERS:
        return None, ""
    joined = "\n".join(headers.keys()).lower()  # in C: lower() on each name costs more
    names = joined.split("\n")
    if not unusual.isdisjoint(names) or ("connection" in names and _connection_named(headers)):
        return None, ""
    out = CIMultiDict(headers)
    for name in dropped.intersection(names):
        del out[name]
    return out, joined


def forwardable_request_headers(headers: Any) -> tuple[CIMultiDict[str], str | None]:
    """The headers to send upstream, and why the request must be refused (a host-steering header)."""
    out, joined = _fast_copy(headers, UNUSUAL_REQUEST_HEADERS, DROPPED_REQUEST_HEADERS)
    if out is None:
        return filter_request_headers(headers)
    if "x-ledger-" in joined:  # the proxy's own headers are not forwarded
        for name in joined.split("\n"):
            if name[:9] == "x-ledger-":
                out.popall(name, None)
    return out, None


def filter_request_headers(headers: Any) -> tuple[CIMultiDict[str], str | None]:
    """forwardable_request_headers, one header at a time: for requests with unusual headers."""
    dropped = _connection_named(headers) if "Connection" in headers else frozenset()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in NOT_FORWARDED_REQUEST or lower[:9] == "x-ledger-" or (dropped and lower in dropped):
            continue
        if lower in STEERING_HEADERS or (lower == "forwarded" and "host=" in value.lower()):
            return out, f"header {name} is not accepted: the upstream is fixed by configuration"
        out.add(name, value)
    return out, None


def forwardable_response_headers(headers: Any) -> CIMultiDict[str]:
    """The upstream's headers for the client, without hop-by-hop ones."""
    out, _ = _fast_copy(headers, UNUSUAL_RESPONSE_HEADERS, DROPPED_RESPONSE_HEADERS)
    return filter_response_headers(headers) if out is None else out


def filter_response_headers(headers: Any) -> CIMultiDict[str]:
    """forwardable_response_headers, one header at a time."""
    dropped = _connection_named(headers) if "Connection" in headers else frozenset()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in NOT_FORWARDED_RESPONSE or (dropped and lower in dropped):
            continue
        out.add(name, value)
    return out


def refusal(request: web.Request) -> str | None:
    """Why a request target may not pass (the proxy is not an open proxy), or None."""
    if request.method == "CONNECT":
        return "CONNECT is not supported: chatledger forwards only to its configured upstream"
    if not request.raw_path.startswith("/"):
        return "absolute-form request targets are not accepted: send the path only"
    return None
