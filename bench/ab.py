"""`python -m bench.ab`: a paired A/B of throughput between two or more targets, for decisions.

`python -m bench` gives the issue's table in five minutes; on a shared VM whose speed drifts by tens of
percent within a minute, its 2-3 rounds cannot tell a 5% change. This runs many short wrk runs (32
connections) in alternating order (A B, B A, ...), waits after every chatledger run until its writer has
written what the run left queued (so the next run, of either target, does not share the CPU with that
backlog), and reports each target's mean and the ratio of every target to the first: the median and mean
of the per-round ratios (runs seconds apart, under the same drift) and their spread. Non-streaming only,
against nginx (or the Python upstream without it).

Targets: `passthrough`, `same-relay` (the passthrough relaying as chatledger does), `chatledger` (default
config), `chatledger=FILE.toml` (with that config file, e.g. another `[database] flush_interval`), `chatledger@DIR`
(the code of another checkout, e.g. `git worktree add /tmp/base HEAD~1`, to measure a change; it may take
`=FILE.toml` too).

Run: `python -m bench.ab passthrough chatledger --rounds 14 --duration 3`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from .__main__ import CHAT_PATH, ledger_command, passthrough_command, python_upstream_command, wait_caught_up
from .payloads import request_body
from .procs import Service, cpu_seconds, free_port, process_cpu
from .upstream import nginx_command, nginx_config
from .wrk import run_wrk, write_script, wrk_binary

TARGETS = "passthrough, same-relay, chatledger, chatledger=FILE.toml, chatledger@DIR or chatledger@DIR=FILE.toml"


def ledger_database(work: Path, index: int) -> Path:
    return work / f"ledger-{index}.db"


def target_service(name: str, upstream_url: str, work: Path, index: int) -> Service:
    port = free_port()
    log = work / f"target-{index}.log"
    if name == "passthrough":
        return Service(name, passthrough_command(port, upstream_url), port, log)
    if name == "same-relay":
        return Service(name, passthrough_command(port, upstream_url, same_relay=True), port, log)
    kind, _, config = name.partition("=")
    kind, _, tree = kind.partition("@")
    if kind != "chatledger":
        raise SystemExit(f"unknown target {name!r}: {TARGETS}")
    env = {"CHATLEDGER_CONFIG": str(Path(config).resolve())} if config else {}
    cwd = None
    if tree:  # python -m puts the working directory first on sys.path, the writer child inherits both
        cwd = Path(tree).resolve()
        if not (cwd / "proxy" / "__init__.py").is_file():
            raise SystemExit(f"target {name!r}: {cwd} is not a chatledger checkout (no proxy/__init__.py)")
        env["PYTHONPATH"] = str(cwd)
    command = ledger_command(port, upstream_url, ledger_database(work, index))
    return Service(name, command, port, log, health="/_ledger/health", env=env, cwd=cwd)


def wait_written(service: Service, work: Path, index: int) -> None:
    """python -m bench's wait: nothing queued, nothing in the spool, so the next run has the CPU to itself."""
    target = {"url": f"http://127.0.0.1:{service.port}", "database": ledger_database(work, index)}
    if wait_caught_up(target, timeout=60, idle_reads=2) is None:
        print(f"  warning: {service.name} still had records to write after 60 s", flush=True)


def helper_cpu(pid: int) -> float:
    """CPU seconds of the processes under `pid` (chatledger's writer), not of `pid` itself."""
    return cpu_seconds(pid) - process_cpu(pid)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n", 1)[0])
    parser.add_argument("targets", nargs="+", help="two or more: the first is the reference")
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--duration", type=int, default=3, help="whole seconds per run, as wrk takes them (default 3)")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if len(args.targets) < 2:
        raise SystemExit("name two targets or more")
    if args.rounds < 2:
        raise SystemExit("--rounds: at least 2 (a spread needs two ratios)")
    if wrk_binary() is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="chatledger-ab-"))
    port = free_port()
    services = [target_service(name, f"http://127.0.0.1:{port}", work, n) for n, name in enumerate(args.targets)]
    upstream_command = nginx_command(nginx_config(port, work / "nginx")) or python_upstream_command(port)
    upstream = Service("upstream", upstream_command, port, work / "upstream.log")
    script = write_script(work, "json", request_body(False, include_usage=True))
    rates: list[list[float]] = [[] for _ in services]
    cpu: list[list[float]] = [[] for _ in services]
    errors = [0 for _ in services]
    writer_us: list[list[float]] = [[] for _ in services]  # the writer child's CPU per call, backlog included
    try:
        upstream.start()
        for service in services:
            service.start(timeout=60)
        for n, service in enumerate(services):  # warm-up
            run_wrk(f"http://127.0.0.1:{service.port}{CHAT_PATH}", script, args.connections, 2)
            if service.health is not None:
                wait_written(service, work, n)
        for round_number in range(args.rounds):
            order = list(range(len(services)))
            if round_number % 2:
                order.reverse()
            for n in order:
                service = services[n]
                before, before_helpers = process_cpu(service.pid), helper_cpu(service.pid)
                result = run_wrk(f"http://127.0.0.1:{service.port}{CHAT_PATH}", script, args.connections, args.duration)
                rates[n].append(result["rps"])
                errors[n] += result["errors"]
                cpu[n].append((process_cpu(service.pid) - before) / result["duration"])
                if service.health is not None:
                    wait_written(service, work, n)
                    calls = result["rps"] * result["duration"]
                    if calls:  # a run with no answers has no cost per call (its errors are reported)
                        writer_us[n].append((helper_cpu(service.pid) - before_helpers) / calls * 1e6)
    finally:
        for service in services:
            service.stop()
        upstream.stop()
    print(f"{args.rounds} rounds of {args.duration} s, {args.connections} connections, work dir {work}")
    for name, runs, shares, failed, writer in zip(args.targets, rates, cpu, errors, writer_us, strict=True):
        print(
            f"  {name:<28} mean {statistics.fmean(runs):>7,.0f} req/s, serving process CPU "
            f"{100 * statistics.fmean(shares):.0f}%"
            + (f", writer {statistics.median(writer):.0f} us/call" if writer else "")
            + f"  runs: {' '.join(f'{r:.0f}' for r in runs)}"
            + (f"  ERRORS {failed} (counted in req/s by wrk: compare nothing)" if failed else "")
        )
    for name, runs in zip(args.targets[1:], rates[1:], strict=True):
        ratios = [b / a for a, b in zip(rates[0], runs, strict=True)]
        print(
            f"  {name} / {args.targets[0]}: median {statistics.median(ratios):.3f}, mean "
            f"{statistics.fmean(ratios):.3f} (stdev {statistics.stdev(ratios):.3f}, n={len(ratios)}), "
            f"ratio of means {statistics.fmean(runs) / statistics.fmean(rates[0]):.3f}"
        )


if __name__ == "__main__":
    main()
