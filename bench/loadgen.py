"""A Python load generator in its own process (the fallback when wrk is missing, and the streaming probe).

N connections, each sending the fixed request back to back until the deadline; requests in flight at the
deadline are finished, not cut, so every request sent is counted. Prints one JSON line. For streaming
with `--gap-us`, the upstream stamps each event with its send time and this reports how long each event
took to arrive (per-event latency). Run: `python -m bench.loadgen --url URL --connections 32 --duration 5`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import aiohttp
import orjson

from .payloads import COMPLETION_BODY, END_MARKERS, EVENTS_PER_STREAM, mode_request_body

AUTH = "Bearer sk-bench-0123456789abcdefghijklmnopqrstuvwxyz"


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))]


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.event_latencies: list[float] = []
        self.events = 0
        self.errors = 0
        self.bad_bodies = 0
        self.first_error: str | None = None

    def error(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message


async def _stream(
    response: aiohttp.ClientResponse, stats: Stats, stamped: bool, cut_allowed: bool, mode: str = "stream"
) -> bool:
    """Read one streamed answer; whether it was whole (every event, and the stream's end marker)."""
    expected, end_marker = EVENTS_PER_STREAM[mode], END_MARKERS[mode]
    counts_end = mode != "stream"  # [DONE] is no event; the other streams end with a real one
    buffer = b""
    events = 0
    done = False
    async for chunk in response.content.iter_any():
        now = time.monotonic_ns()
        buffer += chunk
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            event, buffer = buffer[:end], buffer[end + 2 :]
            if event.startswith(end_marker):
                done = True
                if not counts_end:
                    continue
            events += 1
            if stamped:
                at = event.find(b'"fp_t')
                if at >= 0:
                    stats.event_latencies.append((now - int(event[at + 5 : at + 24])) / 1e6)
    stats.events += events
    # chatledger cuts the usage chunk out when it asked for it (requests sent with --no-include-usage)
    return done and (events == expected or (cut_allowed and events == expected - 1))


async def _worker(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    body: bytes,
    headers: dict[str, str],
    deadline: float,
    stats: Stats,
) -> None:
    stamped = args.gap_us > 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            async with session.post(args.url, data=body, headers=headers) as response:
                if response.status != 200:
                    await response.read()
                    stats.error(f"HTTP {response.status}")
                    continue
                if args.stream:
                    ok = await _stream(response, stats, stamped, args.no_include_usage, stream_mode(args))
                else:
                    ok = len(await response.read()) == len(COMPLETION_BODY)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            stats.error(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.01)
            continue
        stats.latencies.append((time.perf_counter() - started) * 1000)
        if not ok:
            stats.bad_bodies += 1


def stream_mode(args: argparse.Namespace) -> str:
    """The `python -m bench` mode of these requests."""
    return "stream" if args.api == "chat" else args.api


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.api != "chat":
        args.stream = True  # the other APIs are measured streaming
    body = mode_request_body(stream_mode(args) if args.stream else "json", include_usage=not args.no_include_usage)
    headers = {"Content-Type": "application/json", "Authorization": AUTH}
    if args.gap_us > 0:
        headers["X-Bench-Gap-Us"] = str(args.gap_us)
    stats = Stats()
    connector = aiohttp.TCPConnector(limit=args.connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        deadline = started + args.duration
        await asyncio.gather(
            *(_worker(session, args, body, headers, deadline, stats) for _ in range(args.connections))
        )
        elapsed = time.perf_counter() - started
    latencies = sorted(stats.latencies)
    events = sorted(stats.event_latencies)
    return {
        "tool": "python",
        "connections": args.connections,
        "duration": elapsed,
        "requests": len(latencies),
        "sent": len(latencies) + stats.errors,
        "errors": stats.errors,
        "bad_bodies": stats.bad_bodies,
        "first_error": stats.first_error,
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "events": stats.events,
        "events_per_s": stats.events / elapsed,
        "event_p50_ms": percentile(events, 0.50),
        "event_p99_ms": percentile(events, 0.99),
        "event_samples": len(events),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--url", required=True, help="full URL, e.g. http://127.0.0.1:9002/v1/chat/completions"
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument(
        "--stream", action="store_true", help="send stream:true requests and count SSE events"
    )
    parser.add_argument("--gap-us", type=int, default=0, help="ask the upstream to pace events (stamped)")
    parser.add_argument(
        "--no-include-usage", action="store_true", help="stream requests without stream_options (SDK default)"
    )
    parser.add_argument(
        "--api",
        choices=("chat", "responses", "messages"),
        default="chat",
        help="the request and stream format: chat, OpenAI Responses or Anthropic Messages (always streamed)",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
