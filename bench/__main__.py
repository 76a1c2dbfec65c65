"""`python -m bench`: upstream, bare passthrough and chatledger side by side, loaded A B, B A, one table.

Each mode (non-streaming `json`, then `stream`, then the same answer streamed by the OpenAI Responses API
(`responses`) and by Anthropic Messages (`messages`)) starts its own upstream, the passthrough and one
`chatledger serve` per --workers value (each with a fresh SQLite file, full logging), loads every target
in turn for --rounds rounds (throughput at --connections for every target, then latency at one connection;
in reverse order every other round), stops chatledger with SIGTERM and counts the rows it wrote. Then the
writer microbenchmark (bench/writer_bench.py: SQLite, and PostgreSQL when CHATLEDGER_TEST_POSTGRES_URL is
set; --no-writer-bench skips it). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .payloads import EVENTS_PER_STREAM, MODE_PATHS, STREAM_MODES, mode_request_body
from .procs import Service, cpu_seconds, free_port, machine_busy, python_module, rss_mb, wait_listening
from .report import SAME_RELAY_PASSTHROUGH, stream_parity, summarise, table, verdicts
from .upstream import nginx_command, nginx_config
from .wrk import run_wrk, write_script, wrk_binary

REPO = Path(__file__).resolve().parent.parent
CHAT_PATH = "/v1/chat/completions"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up load per target")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of A B (then B A) (default 2)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", default="1,2", help="chatledger --workers values to run (default 1,2)")
    parser.add_argument(
        "--modes",
        default="json,stream,responses,messages",
        help="any of json, stream (chat), responses, messages (default: all four)",
    )
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--upstream",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="non-streaming upstream (streaming always uses the Python one)",
    )
    parser.add_argument(
        "--gap-us",
        type=int,
        default=1000,
        help="event spacing of the paced stream used for per-event latency (default 1000)",
    )
    parser.add_argument(
        "--events-per-write",
        type=int,
        default=10,
        help="unpaced streams: SSE events per upstream write (default 10; 1 = one write per event)",
    )
    parser.add_argument(
        "--stream-request",
        choices=("include-usage", "sdk-default"),
        default="include-usage",
        help="streaming requests ask for usage themselves (default), or send the OpenAI SDK's default body, "
        "so chatledger adds include_usage and cuts the usage chunk out of the client's stream",
    )
    parser.add_argument(
        "--obfuscation",
        action="store_true",
        help="streamed chunks carry OpenAI's random-length `obfuscation` string, as OpenAI sends them by default",
    )
    parser.add_argument(
        "--same-relay-passthrough",
        action="store_true",
        help="also run the passthrough relaying bodies as chatledger does (bench.passthrough --same-relay): "
        "chatledger against it is the cost of logging alone",
    )
    parser.add_argument("--soak", type=float, metavar="SECONDS", help="run the memory soak instead")
    parser.add_argument(
        "--no-writer-bench", action="store_true", help="skip the writer microbenchmark that ends the run"
    )
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases)")
    return parser.parse_args(argv)


def python_upstream_command(port: int, events_per_write: int = 10, obfuscation: bool = False) -> list[str]:
    command = python_module("bench.upstream", "--port", str(port), "--events-per-write", str(events_per_write))
    return [*command, "--obfuscation"] if obfuscation else command


def passthrough_command(port: int, upstream_url: str, same_relay: bool = False) -> list[str]:
    command = python_module("bench.passthrough", "--port", str(port), "--upstream", upstream_url)
    return [*command, "--same-relay"] if same_relay else command


def ledger_command(port: int, upstream_url: str, database: Path, workers: int = 1) -> list[str]:
    return python_module(
        "proxy", "serve", "--host", "127.0.0.1", "--port", str(port), "--upstream", upstream_url,
        "--database", str(database), "--workers", str(workers),
    )  # fmt: skip


def use_wrk(args: argparse.Namespace) -> bool:
    if args.loadgen == "wrk" and wrk_binary() is None:
        raise SystemExit("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    return args.loadgen != "python" and wrk_binary() is not None


def python_load(
    url: str,
    connections: int,
    duration: float,
    stream: bool,
    gap_us: int = 0,
    include_usage: bool = True,
    api: str = "chat",
) -> dict[str, Any]:
    command = python_module(
        "bench.loadgen",
        "--url",
        url,
        "--connections",
        str(connections),
        "--duration",
        str(duration),
        "--gap-us",
        str(gap_us),
        "--api",
        api,
    )
    if stream:
        command.append("--stream")
    if not include_usage:
        command.append("--no-include-usage")
    out = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=duration + 120, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-1000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _self_and_waited_children() -> float:
    """CPU of this process plus its finished children (the load generators it waited for)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.wrk = use_wrk(args)
        self.include_usage = args.stream_request == "include-usage"
        self.scripts = {m: write_script(work, m, mode_request_body(m, self.include_usage)) for m in MODE_PATHS}

    # ---- services -----------------------------------------------------------------------------

    def upstream(self, mode: str) -> tuple[Service, str]:
        port = free_port()
        kind = "python"
        if mode == "json" and self.args.upstream in ("auto", "nginx"):
            command = nginx_command(nginx_config(port, self.work / f"nginx-{port}"))
            if command is not None:
                kind = "nginx"
            elif self.args.upstream == "nginx":
                raise SystemExit("--upstream nginx: nginx is not installed (apt-get install nginx)")
        if kind == "python":
            command = python_upstream_command(port, self.args.events_per_write, self.args.obfuscation)
        assert command is not None
        service = Service(f"upstream-{mode}", command, port, self.work / f"upstream-{mode}.log")
        service.start()
        return service, kind

    def passthrough(self, upstream_url: str, same_relay: bool = False) -> Service:
        port = free_port()
        name = SAME_RELAY_PASSTHROUGH if same_relay else "passthrough"
        command = passthrough_command(port, upstream_url, same_relay)
        return Service(name, command, port, self.work / f"{name.replace(' ', '-')}.log")

    def ledger(self, upstream_url: str, workers: int, mode: str) -> tuple[Service, Path]:
        port = free_port()
        database = self.work / f"ledger-{mode}-w{workers}.db"
        command = ledger_command(port, upstream_url, database, workers)
        log = self.work / f"chatledger-{mode}-w{workers}.log"
        return Service(f"chatledger N={workers}", command, port, log, health="/_ledger/health"), database

    # ---- load ---------------------------------------------------------------------------------

    def load(self, target: dict[str, Any], mode: str, connections: int, duration: float) -> dict[str, Any]:
        url = target["url"] + MODE_PATHS[mode]
        stream = mode in STREAM_MODES
        api = mode if mode in ("responses", "messages") else "chat"
        pid = target["pid"]
        cpu0, (busy0, total0) = cpu_seconds(pid), machine_busy()
        own0 = sum(cpu_seconds(p) for p in self.own_pids) + _self_and_waited_children()
        if stream and connections == 1:
            result = python_load(
                url, 1, duration, stream=True, gap_us=self.args.gap_us, include_usage=self.include_usage, api=api
            )
        elif self.wrk:
            result = run_wrk(url, self.scripts[mode], connections, duration)
        else:
            result = python_load(
                url, connections, duration, stream=stream, include_usage=self.include_usage, api=api
            )
        cpu = cpu_seconds(pid) - cpu0
        busy1, total1 = machine_busy()
        own = sum(cpu_seconds(p) for p in self.own_pids) + _self_and_waited_children() - own0
        result["cpu_us_per_req"] = cpu * 1e6 / result["requests"] if result["requests"] else None
        result["cpu_pct"] = 100 * cpu / result["duration"]
        # CPU used by everything but this benchmark (services, load generator, this process) while
        # we measured: other work on the machine competing with the processes under test.
        result["machine_pct"] = 100 * (busy1 - busy0) / max(total1 - total0, 1e-9)  # of all cores
        result["background_pct"] = 100 * max(0.0, (busy1 - busy0) - own) / max(total1 - total0, 1e-9)
        if target.get("database") is not None:
            target["completed"] += result["requests"]
            target["errors"] += result["errors"]
            target["slack"] += connections if result["tool"] == "wrk" else 0
        return result

    # ---- one mode -----------------------------------------------------------------------------

    def run_mode(self, mode: str) -> dict[str, Any]:
        args = self.args
        upstream, upstream_kind = self.upstream(mode)
        upstream_url = f"http://127.0.0.1:{upstream.port}"
        services: list[Service] = [upstream]
        targets: list[dict[str, Any]] = [{"name": "direct", "url": upstream_url, "pid": upstream.pid}]
        try:
            for same_relay in (False, True) if args.same_relay_passthrough else (False,):
                passthrough = self.passthrough(upstream_url, same_relay)
                passthrough.start()
                services.append(passthrough)
                targets.append(
                    {"name": passthrough.name, "url": f"http://127.0.0.1:{passthrough.port}", "pid": passthrough.pid}
                )
            for workers in [int(w) for w in args.workers.split(",") if w.strip()]:
                ledger, database = self.ledger(upstream_url, workers, mode)
                ledger.start(timeout=60)
                services.append(ledger)
                targets.append(
                    {
                        "name": ledger.name,
                        "url": f"http://127.0.0.1:{ledger.port}",
                        "pid": ledger.pid,
                        "service": ledger,
                        "database": database,
                        "completed": 0,
                        "slack": 0,
                        "errors": 0,
                        "workers": workers,
                    }
                )
            for target in targets:
                if target.get("service") is not None:
                    wait_listening(target["service"].port, target["workers"])
            self.own_pids = [s.pid for s in services]
            for target in targets:
                target["events_per_request"] = EVENTS_PER_STREAM.get(mode, 0)
                target["runs"] = {"thr": [], "lat": []}
                target["rss_start"] = rss_mb(target["pid"]) if target["name"] != "direct" else None
            for target in targets:
                if args.warmup > 0:
                    self.load(target, mode, args.connections, args.warmup)
            for round_number in range(args.rounds):
                # the throughput runs back to back, then the latency runs, each in the order A B C, then
                # C B A in the next round: the machine's speed drifts (by tens of percent within a minute
                # on a shared VM), and runs close together, in alternating order, are compared under
                # the same drift rather than ten seconds and a latency run apart
                order = targets if round_number % 2 == 0 else targets[::-1]
                throughput = []
                for target in order:
                    throughput.append(self.load(target, mode, args.connections, args.duration))
                    if target.get("service") is not None:
                        # see wait_caught_up: the next run, of any target, must not share the machine with
                        # a writer still busy with what these 32 connections left queued
                        settled = wait_caught_up(target, idle_reads=2 * target["workers"])
                        target.setdefault("settle_s", []).append(settled)
                for target, thr in zip(order, throughput, strict=True):
                    lat = self.load(target, mode, 1, args.duration)
                    target["runs"]["thr"].append(thr)
                    target["runs"]["lat"].append(lat)
                    print(
                        f"  [{mode} round {round_number + 1}] {target['name']:<16} "
                        f"{thr['rps']:>9,.0f} req/s  "
                        f"1c p50 {lat.get('event_p50_ms') or lat['p50_ms']:.3f} ms  "
                        f"cpu {thr['cpu_pct']:.0f}%  machine {thr['machine_pct']:.0f}%  "
                        f"background {thr['background_pct']:.0f}%"
                        + (
                            f"  errors {thr['errors'] + lat['errors']}"
                            if thr["errors"] + lat["errors"]
                            else ""
                        ),
                        flush=True,
                    )
            for target in targets:
                if target["name"] != "direct":
                    target["rss_end"] = rss_mb(target["pid"])
            for target in targets:
                if target.get("service") is not None:
                    target["catch_up_s"] = wait_caught_up(target)
                    if target["workers"] == 1:  # with more, /metrics answers for one worker at a time
                        target["parsed_in_server"] = parsed_in_server(target["url"])
                    target["exit_code"] = target["service"].stop()
                    target.update(count_rows(target["database"]))
                    target["replayed"] = replayed_from_spool(target["service"].log)
        finally:
            for service in reversed(services):
                service.stop(timeout=30)
        direct = summarise(targets[0], mode, None)
        rows = [direct] + [summarise(t, mode, direct) for t in targets[1:]]
        for target in targets:
            target.pop("service", None)
            target["database"] = str(target.get("database") or "") or None
        return {"mode": mode, "upstream": upstream_kind, "targets": targets, "summary": rows}


def wait_caught_up(target: dict[str, Any], timeout: float = 120.0, idle_reads: int = 6) -> float | None:
    """Seconds until the writers have nothing queued and the spool is empty (None: not within timeout).

    Under a saturated CPU the writer (a lower-priority process) falls behind and spools what waited
    over a second; it catches up once the load stops. Health answers from one worker at a time, so it
    must read idle several times in a row (`idle_reads`).

    Also run between a throughput run and the latency run that follows it: the one-connection figure is
    then chatledger serving one connection, not one connection next to a writer still busy with what the
    32 connections left queued (the passthrough has no such backlog to finish).
    """
    start = time.monotonic()
    spool = target["database"].with_name(target["database"].name + ".spool")
    seen = 0
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(target["url"] + "/_ledger/health", timeout=5) as response:
                health = json.load(response)
        except OSError:
            health = {"queue_depth": -1}
        segments = list(spool.glob("*.jsonl")) if spool.exists() else []
        idle = health.get("queue_depth") == 0 and not [p for p in segments if not p.name.startswith("rejected")]
        seen = seen + 1 if idle else 0
        if seen >= idle_reads:
            return round(time.monotonic() - start, 1)
        time.sleep(0.25)
    return None


def parsed_in_server(url: str) -> int | None:
    """Calls the serving process parsed itself because its writer process was behind (from /metrics)."""
    try:
        with urllib.request.urlopen(url + "/_ledger/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chatledger_calls_parsed_in_server_total":
                return int(sample.value)
    return None


def replayed_from_spool(log: Path) -> int:
    """Records the writers wrote late, through the spool (a writer that cannot keep up spools what waited
    over a second), from the `replayed N record(s)` lines of chatledger's log."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(int(count) for count in re.findall(r"replayed (\d+) record", text))


def count_rows(database: Path) -> dict[str, Any]:
    """Rows in a chatledger SQLite file after it has drained, by outcome, plus rows left in its spool.

    A row only in the spool is not lost (the next start replays it) but is not in the database either.
    """
    with sqlite3.connect(database) as conn:
        outcomes = dict(conn.execute("SELECT outcome, count(*) FROM completions GROUP BY outcome").fetchall())
        choices = conn.execute("SELECT count(*) FROM completion_choices").fetchone()[0]
        in_db = {row[0] for row in conn.execute("SELECT request_id FROM completions")}
    spool = database.with_name(database.name + ".spool")
    spooled: set[str] = set()
    spool_bytes = 0
    for segment in sorted(spool.glob("*.jsonl")) if spool.exists() else []:
        spool_bytes += segment.stat().st_size
        for line in segment.read_bytes().splitlines():
            try:
                spooled.add(json.loads(line)["request_id"])
            except (ValueError, KeyError, TypeError):
                spooled.add(f"unreadable-{len(spooled)}")
    return {
        "rows": sum(outcomes.values()),
        "outcomes": outcomes,
        "choice_rows": choices,
        "spool_bytes": spool_bytes,
        "spool_rows": len(spooled),
        "spool_only": len(spooled - in_db),
    }


def versions() -> dict[str, str]:
    import aiohttp
    import sqlalchemy

    found = {
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "kernel": platform.release(),
    }
    try:
        import uvloop  # type: ignore[import-not-found]

        found["uvloop"] = uvloop.__version__
    except ImportError:
        found["uvloop"] = "not installed"
    for tool, flag in (("wrk", "-v"), ("nginx", "-v")):
        path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
        if path:
            out = subprocess.run([path, flag], capture_output=True, text=True, check=False)
            found[tool] = (
                (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr) else "?"
            )
    try:
        model = next(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")
        )
        found["cpu"] = model.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    found["cores"] = str(os.cpu_count())
    found["loadavg"] = Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="chatledger-bench-"))
    started = time.monotonic()
    info = versions()
    print(f"chatledger bench {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, work dir {work}")
    print("  " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    try:
        if args.soak:
            from .soak import run_soak

            results: dict[str, Any] = {"info": info, "soak": run_soak(Bench(args, work), args.soak)}
        else:
            bench = Bench(args, work)
            print(f"  load generator: {'wrk' if bench.wrk else 'python (bench.loadgen)'}", flush=True)
            if args.obfuscation:
                print("  streamed chunks carry OpenAI's obfuscation padding", flush=True)
            results = {"info": info, "modes": []}
            for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
                results["modes"].append(bench.run_mode(mode))
            print()
            for result in results["modes"]:
                print(
                    f"{result['mode']} (upstream: {result['upstream']}, {args.rounds} rounds of "
                    f"{args.duration:g}s; latency columns at 1 connection)"
                )
                print(table(result["mode"], result["summary"], result["targets"], args.connections))
                print()
            for result in results["modes"]:
                for line in verdicts(result["mode"], result["summary"]):
                    print(line)
            for line in stream_parity(results["modes"]):
                print(line)
            if not args.no_writer_bench:
                from . import writer_bench

                print("\nwriter microbenchmark (python -m bench.writer_bench: 3 x 50,000 rows per database)")
                results["writer"] = writer_bench.run(writer_bench.parse_args([]))
        print(f"\ntotal {time.monotonic() - started:.0f}s")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
