"""`python -m bench.profile`: where chatledger's CPU goes per request, sampled by py-spy under load.

Starts the upstream and one `chatledger serve` (SQLite, full logging), loads it with wrk (or the
Python load generator), and records it with `py-spy record --format raw` (collapsed stacks: open the
file in https://www.speedscope.app or feed it to flamegraph.pl). Then prints the top functions by self
and inclusive time, and by package, converted to CPU µs per request with the process's measured CPU.
Needs `pip install py-spy` (ptrace; root or CAP_SYS_PTRACE). `--target passthrough` profiles the reference.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .__main__ import Bench, parse_args
from .procs import children, process_cpu

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _package(file: str) -> str:
    if file.startswith("<"):
        return "python runtime"
    parts = Path(file).parts
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    if not parts:
        return file
    head = parts[0]
    if head in ("proxy", "bench"):
        return "/".join(parts[:2])
    if head.endswith(".py") or re.fullmatch(r"python3\.\d+", head):
        return "stdlib " + (parts[0] if parts[0].endswith(".py") else "/".join(parts[:2]))
    return head


@dataclass
class Samples:
    """A py-spy raw (collapsed) profile, counted by thread, package, leaf function and any frame."""

    self_counts: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    packages: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)
    total: int = 0


def parse(raw: Path) -> Samples:
    samples = Samples()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]
        samples.threads[thread.split(":", 1)[-1].strip() or thread] += count
        frames = [f for f in frames[1:] if f]
        samples.total += count
        if not frames:
            samples.self_counts["(native code: event loop, C extensions)"] += count
            samples.packages["(native)"] += count
            continue
        names = []
        for frame in frames:
            match = FRAME.match(frame)
            names.append(f"{match['func']} ({match['file']})" if match else frame)
        samples.self_counts[names[-1]] += count
        match = FRAME.match(frames[-1])
        samples.packages[_package(match["file"]) if match else "?"] += count
        for name in set(names):
            samples.inclusive[name] += count
    return samples


def summarise(raw: Path, us_per_sample: float | None, top: int = 25) -> str:
    """Self, inclusive and per-package sample shares of a py-spy raw (collapsed) profile.

    us_per_sample converts a sample count to µs per request: 1e6 / (rate * requests while sampled).
    """
    samples = parse(raw)
    self_counts, inclusive, packages, threads = (
        samples.self_counts,
        samples.inclusive,
        samples.packages,
        samples.threads,
    )
    total = samples.total
    if not total:
        return "no samples"

    def cost(count: int) -> str:
        per_request = f"{count * us_per_sample:7.1f} µs/req" if us_per_sample else ""
        return f"{100 * count / total:5.1f}%  {per_request}"

    out = [f"{total} samples = {cost(total).strip()}"]
    out.append("\nby thread:")
    out += [f"  {cost(c)}  {name}" for name, c in threads.most_common()]
    out.append("\nby package (self time):")
    out += [f"  {cost(c)}  {name}" for name, c in packages.most_common(top)]
    out.append(f"\ntop {top} functions by self time:")
    out += [f"  {cost(c)}  {name}" for name, c in self_counts.most_common(top)]
    out.append(f"\ntop {top} chatledger/bench functions by inclusive time:")
    ours = [(n, c) for n, c in inclusive.most_common() if "proxy/" in n or "bench/" in n]
    out += [f"  {cost(c)}  {name}" for name, c in ours[:top]]
    out.append(f"\ntop {top} functions by inclusive time (all):")
    out += [f"  {cost(c)}  {name}" for name, c in inclusive.most_common(top)]
    return "\n".join(out)


def diff(first: Path, second: Path, top: int = 30) -> str:
    """Per-request self time of `first` minus `second` (two profile.py outputs: the cost chatledger adds)."""
    runs = []
    for base in (first, second):
        meta = json.loads(base.with_suffix(".json").read_text())
        runs.append(
            (meta, parse(base.with_suffix(".raw.txt")), 1e6 / (meta["rate"] * meta["rps"] * meta["seconds"]))
        )
    (meta_a, a, ua), (meta_b, b, ub) = runs
    out = [
        f"{meta_a['target']} - {meta_b['target']} ({meta_a['mode']}), GIL-holding µs per request:",
        f"  total {a.total * ua:7.1f} - {b.total * ub:7.1f} = {a.total * ua - b.total * ub:+7.1f}",
    ]
    for title, key in (("package", "packages"), ("function (self)", "self_counts")):
        ca, cb = getattr(a, key), getattr(b, key)
        rows = sorted(((ca[n] * ua - cb[n] * ub, n) for n in set(ca) | set(cb)), reverse=True)
        out.append(f"\nby {title}, largest differences:")
        out += [f"  {d:+7.1f} µs/req  ({ca[n] * ua:6.1f} vs {cb[n] * ub:6.1f})  {n}" for d, n in rows[:top]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=("json", "stream"), default="json")
    parser.add_argument("--target", choices=("chatledger", "passthrough"), default="chatledger")
    parser.add_argument(
        "--process",
        choices=("serving", "writer"),
        default="serving",
        help="chatledger's serving process (default) or its writer process (one worker)",
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every thread, not only the one holding the GIL (py-spy counts some waits as busy)",
    )
    parser.add_argument("--out", default="bench-profile", help="directory for the raw profile and report")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--stream-request",
        choices=("include-usage", "sdk-default"),
        default="include-usage",
        help="as python -m bench: sdk-default streams make chatledger add include_usage and cut the usage chunk",
    )
    parser.add_argument(
        "--diff",
        nargs=2,
        metavar=("A", "B"),
        help="print the per-request cost of profile A minus B (paths without suffix, e.g. "
        "bench-profile/chatledger-json bench-profile/passthrough-json) and exit",
    )
    args = parser.parse_args(argv)
    if args.process == "writer" and args.target != "chatledger":
        parser.error("--process writer needs --target chatledger")
    if args.diff:
        print(diff(Path(args.diff[0]), Path(args.diff[1])))
        return 0
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="chatledger-profile-"))
    bench_args = parse_args(
        ["--connections", str(args.connections), "--loadgen", args.loadgen, "--stream-request", args.stream_request]
    )
    bench = Bench(bench_args, work)
    upstream, _ = bench.upstream(args.mode)
    services = [upstream]
    try:
        upstream_url = f"http://127.0.0.1:{upstream.port}"
        if args.target == "chatledger":
            service, _database = bench.ledger(upstream_url, 1, "profile")
        else:
            service = bench.passthrough(upstream_url)
        service.start(timeout=60)
        services.append(service)
        bench.own_pids = [s.pid for s in services]
        target: dict[str, Any] = {
            "name": args.target,
            "url": f"http://127.0.0.1:{service.port}",
            "pid": service.pid,
        }
        bench.load(target, args.mode, args.connections, 2.0)  # warm-up
        sdk = "-sdk-default" if args.mode == "stream" and args.stream_request == "sdk-default" else ""
        name = f"{args.target}-{args.mode}{sdk}" + ("-writer" if args.process == "writer" else "")
        raw = out / f"{name}.raw.txt"
        result: dict[str, Any] = {}

        def load() -> None:
            result.update(bench.load(target, args.mode, args.connections, args.seconds + 1))

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(0.5)
        pid = service.pid
        if args.process == "writer":
            pid = children(service.pid)[0]
        cpu0, t0 = process_cpu(pid), time.monotonic()
        command = [
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(args.rate),
            "--duration",
            str(int(args.seconds)),
            "--threads",
            "--format",
            "raw",
            "-o",
            str(raw),
        ]
        subprocess.run(command + ([] if args.all_threads else ["--gil"]), check=True, capture_output=True)
        cpu, elapsed = process_cpu(pid) - cpu0, time.monotonic() - t0
        loader.join()
    finally:
        for service_ in reversed(services):
            service_.stop(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    rps = result["rps"]
    cpu_us = cpu * 1e6 / (rps * elapsed) if rps else None
    header = (
        f"{args.target} ({args.process} process) {args.mode}: {rps:,.0f} req/s at {args.connections} "
        f"connections; process CPU "
        f"{100 * cpu / elapsed:.0f}% = {cpu_us or 0:.0f} µs/req while sampled; "
        + ("all threads" if args.all_threads else "samples of the thread holding the GIL only")
    )
    us_per_sample = 1e6 / (args.rate * rps * args.seconds) if rps else None
    report = header + "\n" + summarise(raw, us_per_sample)
    (out / f"{name}.txt").write_text(report + "\n")
    meta = {
        "target": args.target,
        "mode": args.mode,
        "rate": args.rate,
        "rps": rps,
        "seconds": args.seconds,
        "cpu_us_per_request": cpu_us,
        "gil_only": not args.all_threads,
    }
    (out / f"{name}.json").write_text(json.dumps(meta))
    print(report)
    print(f"\nraw profile (speedscope / flamegraph.pl): {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
