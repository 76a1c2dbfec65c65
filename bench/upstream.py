"""A fake OpenAI upstream that is never the bottleneck: a bare asyncio Protocol HTTP/1.1 server, or nginx.

Every POST gets a fixed answer. A body with `"stream":true` gets the 200-event SSE completion (each event
its own HTTP chunk and its own write, like a real upstream), or, on a path ending in /responses or
/messages, the same answer as a Responses API or Anthropic Messages stream; anything else gets the
ChatCompletion JSON. With the header `X-Bench-Gap-Us: N` a stream is paced, one event every N
microseconds, and each event carries its send time (CLOCK_MONOTONIC ns) in `system_fingerprint` (the
other APIs: in each content delta) so a client can measure how long each event took to reach it.
Run: `python -m bench.upstream --port 9001`.

nginx (`nginx_config`) answers non-streaming POSTs from a `return 200` with the same body; it cannot stream.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import time
from pathlib import Path

from .payloads import (
    COMPLETION_BODY,
    STAMP,
    STAMPED_EVENT_BYTES,
    STREAM_EVENT_BYTES,
    messages_events,
    responses_events,
    stream_events,
)

_JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"x-request-id: req_bench_0123456789abcdef\r\n"
    b"openai-processing-ms: 412\r\n"
    b"Content-Length: %d\r\n\r\n" % len(COMPLETION_BODY)
)
JSON_RESPONSE = _JSON_HEAD + COMPLETION_BODY
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"x-request-id: req_bench_0123456789abcdef\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_STAMP = STAMP.encode()


def _framed(event: bytes) -> bytes:
    """One HTTP/1.1 chunk holding one SSE event."""
    return b"%x\r\n%s\r\n" % (len(event), event)


# per stream kind (chat, responses, messages): the framed events, the stamped ones, the unpaced writes
FRAMED_EVENTS = {
    "chat": [_framed(event) for event in STREAM_EVENT_BYTES],
    "responses": [_framed(event) for event in responses_events()],
    "messages": [_framed(event) for event in messages_events()],
}
STAMPED_EVENTS = {
    "chat": list(STAMPED_EVENT_BYTES),
    "responses": responses_events(STAMP),
    "messages": messages_events(STAMP),
}
LAST_CHUNK = b"0\r\n\r\n"
WRITES: dict[str, list[bytes]] = {}


def set_obfuscation(on: bool) -> None:
    """Chat stream chunks with OpenAI's `obfuscation` padding (see payloads.stream_events), or without;
    call set_events_per_write after it."""
    FRAMED_EVENTS["chat"] = [_framed(event) for event in stream_events(obfuscation=on)]
    STAMPED_EVENTS["chat"] = stream_events(STAMP, obfuscation=on)


def set_events_per_write(count: int) -> None:
    """How an unpaced stream is written: `count` events per transport write (1 = one write per event)."""
    count = max(1, count)
    for kind, framed in FRAMED_EVENTS.items():
        groups = [b"".join(framed[i : i + count]) for i in range(0, len(framed), count)]
        groups[-1] += LAST_CHUNK
        WRITES[kind] = [STREAM_HEAD + groups[0], *groups[1:]]


set_events_per_write(1)


def stream_kind(head: bytes) -> str:
    """Which stream a request gets, from its (lower-cased) request line's path."""
    line = head[: head.find(b"\r\n")]
    if b"/responses " in line:
        return "responses"
    if b"/messages " in line:
        return "messages"
    return "chat"

BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def stamped_event(kind: str, index: int) -> bytes:
    """Event `index` of the stream, framed, with the current monotonic time in place of the stamp."""
    event = STAMPED_EVENTS[kind][index]
    if _STAMP in event:
        event = event.replace(_STAMP, b"fp_t%019d" % time.monotonic_ns())
    return _framed(event)


class UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length request bodies only (what wrk and aiohttp send)."""

    __slots__ = ("_buffer", "_busy", "_task", "_transport")

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._busy = False
        self._task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data
        if not self._busy:
            self._process()

    def _process(self) -> None:
        transport = self._transport
        while transport is not None and not self._busy:
            buffer = self._buffer
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buffer[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            elif b"\r\ntransfer-encoding:" in head:
                transport.write(BAD_REQUEST)
                transport.close()
                return
            total = end + 4 + length
            if len(buffer) < total:
                return
            body = buffer[end + 4 : total]
            self._buffer = buffer[total:]
            close = b"\r\nconnection: close" in head
            if b'"stream":true' in body or b'"stream": true' in body:
                kind = stream_kind(head)
                gap_at = head.find(b"\r\nx-bench-gap-us:")
                if gap_at >= 0:
                    stop = head.find(b"\r\n", gap_at + 2)
                    gap = int(head[gap_at + 17 : stop if stop >= 0 else len(head)]) / 1e6
                    self._busy = True
                    self._task = asyncio.ensure_future(self._paced(transport, kind, gap, close))
                    return
                for chunk in WRITES[kind]:
                    transport.write(chunk)
            else:
                transport.write(JSON_RESPONSE)
            if close:
                transport.close()
                return

    async def _paced(self, transport: asyncio.Transport, kind: str, gap: float, close: bool) -> None:
        transport.write(STREAM_HEAD)
        count = len(STAMPED_EVENTS[kind])
        for index in range(count):
            if transport.is_closing():
                return
            transport.write(stamped_event(kind, index))
            if index + 1 < count:
                await asyncio.sleep(gap)
        transport.write(LAST_CHUNK)
        if close:
            transport.close()
            return
        self._busy = False
        if self._buffer:
            self._process()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024, reuse_address=True)
    print(f"upstream listening on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def nginx_config(port: int, prefix: Path) -> Path:
    """Write an nginx.conf under `prefix` that answers every request with the ChatCompletion body."""
    body = COMPLETION_BODY.decode()
    if "'" in body or "$" in body or "\\" in body:
        raise ValueError("the completion body cannot be embedded in an nginx string")
    prefix.mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 16m;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=1024;
        location / {{
            default_type application/json;
            add_header x-request-id req_bench_0123456789abcdef;
            return 200 '{body}';
        }}
    }}
}}
"""
    )
    return conf


def nginx_command(conf: Path) -> list[str] | None:
    """The command that runs nginx in the foreground with `conf`, or None when nginx is not installed."""
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
    )
    if binary is None:
        return None
    return [binary, "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--events-per-write", type=int, default=1, help="unpaced streams: events per write")
    parser.add_argument("--obfuscation", action="store_true", help="chunks carry OpenAI's obfuscation padding")
    args = parser.parse_args()
    if args.obfuscation:
        set_obfuscation(True)
    set_events_per_write(args.events_per_write)
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
