"""`python -m bench --soak SECONDS`: chatledger under mixed load for a long time; is its memory flat?

One `chatledger serve` (the first --workers value) in front of the Python upstream, loaded for SECONDS by
two load generators at once: non-streaming at 3/4 of --connections and streaming at 1/4. RSS of the
process tree is sampled throughout; at the end chatledger is stopped with SIGTERM and its rows counted.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .procs import rss_mb, wait_listening

if TYPE_CHECKING:
    from .__main__ import Bench


def _writer(port: int) -> str:
    """The recorder's counters from /_ledger/health: is the writer keeping up, is it spooling?"""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_ledger/health", timeout=5) as response:
            health = json.loads(response.read())
    except (OSError, ValueError) as exc:
        return f"health: {exc}"
    keys = ("queue_depth", "rows_written", "rows_spooled", "rows_replayed", "rows_lost")
    return " ".join(f"{k}={health[k]}" for k in keys if k in health)


def run_soak(bench: Bench, seconds: float) -> dict[str, Any]:
    from .__main__ import count_rows

    args = bench.args
    workers = int(args.workers.split(",")[0])
    upstream, _kind = bench.upstream("stream")  # the Python upstream answers both kinds
    upstream_url = f"http://127.0.0.1:{upstream.port}"
    services = [upstream]
    result: dict[str, Any] = {"seconds": seconds, "workers": workers}
    try:
        ledger, database = bench.ledger(upstream_url, workers, "soak")
        ledger.start(timeout=60)
        services.append(ledger)
        wait_listening(ledger.port, workers)
        bench.own_pids = [s.pid for s in services]
        target = {
            "name": ledger.name,
            "url": f"http://127.0.0.1:{ledger.port}",
            "pid": ledger.pid,
            "database": database,
            "completed": 0,
            "slack": 0,
            "errors": 0,
        }
        json_connections = max(1, args.connections * 3 // 4)
        stream_connections = max(1, args.connections - json_connections)
        samples: list[tuple[float, float]] = [(0.0, rss_mb(ledger.pid))]
        print(
            f"  soak {seconds:.0f}s: {json_connections} non-streaming + {stream_connections} streaming "
            f"connections; RSS at start {samples[0][1]:.1f} MiB",
            flush=True,
        )
        interval = max(5.0, seconds / 60)
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            loads = [
                pool.submit(bench.load, target, "json", json_connections, seconds),
                pool.submit(bench.load, target, "stream", stream_connections, seconds),
            ]
            while not all(f.done() for f in loads):
                time.sleep(min(interval, 1.0) if time.monotonic() - started < seconds else 0.2)
                elapsed = time.monotonic() - started
                if elapsed - samples[-1][0] >= interval:
                    samples.append((elapsed, rss_mb(ledger.pid)))
                    print(
                        f"    t={elapsed:6.0f}s RSS {samples[-1][1]:.1f} MiB  {_writer(ledger.port)}",
                        flush=True,
                    )
            runs = [f.result() for f in loads]
        samples.append((time.monotonic() - started, rss_mb(ledger.pid)))
        ledger.stop()
        target.update(count_rows(database))
    finally:
        for service in reversed(services):
            service.stop(timeout=30)
    warm = next((rss for t, rss in samples if t >= min(60.0, seconds * 0.1)), samples[0][1])
    result.update(
        {
            "rss_samples_mib": samples,
            "rss_start_mib": samples[0][1],
            "rss_after_warmup_mib": warm,
            "rss_end_mib": samples[-1][1],
            "rss_max_mib": max(rss for _, rss in samples),
            "runs": runs,
            "requests": target["completed"],
            "rows": target["rows"],
            "outcomes": target["outcomes"],
            "slack": target["slack"] + target["errors"],
            "spool_bytes": target["spool_bytes"],
            "spool_rows": target["spool_rows"],
            "spool_only": target["spool_only"],
        }
    )
    from .report import rows_verdict

    print(
        f"\nsoak {seconds:.0f}s, chatledger N={workers}: "
        f"{runs[0]['rps']:,.0f} req/s non-streaming + {runs[1]['rps']:,.0f} req/s streaming"
    )
    print(
        f"RSS MiB: start {result['rss_start_mib']:.1f}, after warm-up {warm:.1f}, "
        f"end {result['rss_end_mib']:.1f}, max {result['rss_max_mib']:.1f} "
        f"(growth after warm-up {result['rss_end_mib'] - warm:+.1f})"
    )
    print(
        f"rows / requests: {rows_verdict(target)}; outcomes {result['outcomes']}; "
        f"spool left {target['spool_rows']:,} rows ({target['spool_bytes']:,} bytes)"
    )
    return result
