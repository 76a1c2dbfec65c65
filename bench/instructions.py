"""`python -m bench.instructions`: CPU instructions per request of the passthrough and of chatledger, counted
by valgrind's callgrind.

Timings on a shared 2-core VM move by ±10% from run to run; an instruction count does not (the same code
and request give the same count, whatever else the machine does). Each target runs under callgrind with
counting off; after a warm-up, counting is switched on for a fixed number of requests (8 connections, the
same request as `python -m bench`), then off. Only the serving process is counted unless `--writer` is
given (chatledger's writer process then runs under callgrind too, and is counted apart); the kernel's
share (syscalls) is never counted. Needs Debian's valgrind. Takes about 30 s per target and mode.

Run: `python -m bench.instructions` (non-streaming), `--mode stream`, `--mode sdk-default`, and the other
APIs' streams: `--mode responses`, `--mode messages`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from .__main__ import ledger_command, passthrough_command, python_upstream_command
from .loadgen import AUTH
from .payloads import MODE_PATHS, mode_request_body
from .procs import Service, children, free_port
from .upstream import nginx_command, nginx_config

WARMUP_REQUESTS = 300
CONNECTIONS = 8


async def _send(url: str, body: bytes, count: int) -> None:
    """`count` requests over CONNECTIONS keep-alive connections, each response read to the end."""
    left = count
    headers = {"Authorization": AUTH, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url}: HTTP {response.status}")

        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))


def _control(pid: int, *options: str) -> None:
    subprocess.run(["callgrind_control", *options, str(pid)], capture_output=True, check=True, timeout=120)


def _total(out_dir: Path, pid: int) -> int:
    """Instructions in the dump written while counting was on (the process's largest callgrind output)."""
    dumps = sorted(out_dir.glob(f"callgrind.out.{pid}*"), key=lambda path: path.stat().st_size)
    totals = [int(line.split()[1]) for line in dumps[-1].read_text().splitlines() if line.startswith("totals:")]
    if not totals or not totals[-1]:
        raise RuntimeError(f"no instruction total in {dumps[-1]}")
    return totals[-1]


def count(
    name: str,
    command: list[str],
    port: int,
    body: bytes,
    requests: int,
    work: Path,
    count_children: bool = False,
    path: str = MODE_PATHS["json"],
) -> list[int]:
    """Instructions per request of the process, then of each child process when `count_children` (the writer)."""
    out_dir = work / name
    out_dir.mkdir()
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--trace-children={'yes' if count_children else 'no'}",
        f"--callgrind-out-file={out_dir}/callgrind.out.%p",
        *command,
    ]
    service = Service(name, valgrind, port, out_dir / "log", health=None)
    service.start(timeout=300)
    try:
        url = f"http://127.0.0.1:{port}{path}"
        asyncio.run(_send(url, body, WARMUP_REQUESTS))
        time.sleep(0.5)
        pids = [service.pid, *(children(service.pid) if count_children else [])]
        for pid in pids:
            _control(pid, "-i", "on")
        asyncio.run(_send(url, body, requests))
        if count_children:
            time.sleep(2.0)  # the writer's share of the last calls
        for pid in pids:
            _control(pid, "-i", "off")
            _control(pid, "-d")
    finally:
        service.stop(timeout=120)
    return [_total(out_dir, pid) // requests for pid in pids]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=("json", "stream", "sdk-default", "responses", "messages"), default="json")
    parser.add_argument("--requests", type=int, default=2000, help="requests counted per target (default 2000)")
    parser.add_argument(
        "--writer", action="store_true", help="count chatledger's writer process too (it then runs under valgrind)"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    stream = args.mode != "json"
    mode = "stream" if args.mode == "sdk-default" else args.mode
    body = mode_request_body(mode, include_usage=args.mode != "sdk-default")
    path = MODE_PATHS[mode]
    work = Path(tempfile.mkdtemp(prefix="chatledger-instructions-"))
    port = free_port()
    upstream_command = None if stream else nginx_command(nginx_config(port, work / "nginx"))
    if upstream_command is None:
        upstream_command = python_upstream_command(port)  # the bench's default: 10 events per write
    upstream = Service("upstream", upstream_command, port, work / "upstream.log")
    upstream.start()
    upstream_url = f"http://127.0.0.1:{port}"
    results: dict[str, int] = {}
    try:
        target_port = free_port()
        (results["passthrough"],) = count(
            "passthrough",
            passthrough_command(target_port, upstream_url),
            target_port,
            body,
            args.requests,
            work,
            path=path,
        )
        target_port = free_port()
        counts = count(
            "chatledger",
            ledger_command(target_port, upstream_url, work / "ledger.db"),
            target_port,
            body,
            args.requests,
            work,
            count_children=args.writer,
            path=path,
        )
        results["chatledger"] = counts[0]
        if args.writer:
            results["writer"] = counts[1]
    finally:
        upstream.stop()
    base = results["passthrough"]
    print(f"instructions per request, {args.mode} ({args.requests} requests, work dir {work}):")
    for name, value in results.items():
        label = {"chatledger": "chatledger (serving process)", "writer": "chatledger's writer process"}.get(name, name)
        print(f"  {label:<30} {value:>12,}  ({value / base:.3f}x passthrough)")


if __name__ == "__main__":
    main()
