"""The listening sockets, bound before anything says "listening": a port in use is one clear line, not a
traceback from inside the server."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

BACKLOG = 1024


class BindError(Exception):
    """The configured address cannot be listened on; the message names the setting to change."""


def bind(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to (a name may give IPv4 and IPv6)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        reason = f"cannot resolve the listen address {host!r} ({exc.strerror})"
        raise BindError(f"{reason}; change --host or [server] host") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise BindError(_explain(exc, host, port)) from None
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        close(sockets)
        raise
    return sockets


def close(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _explain(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use; choose another with --port or [server] port (CHATLEDGER_PORT)"
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on port {port} on {host}; choose a port above 1023 with --port or [server] port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine; change --host or [server] host (CHATLEDGER_HOST)"
    return f"cannot listen on {host}:{port} ({exc.strerror}); change --host/--port or [server] host/port"
