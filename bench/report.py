"""Formatting benchmark results: one table per mode, then the issue's targets checked against them."""

from __future__ import annotations

import statistics
from typing import Any

from .payloads import STREAM_MODES

THROUGHPUT_TARGET = 0.90
LATENCY_TARGET = 1.2


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _int(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def rows_verdict(target: dict[str, Any]) -> str:
    """`rows / requests ok`: every request has its row in the database (wrk cannot say exactly how many
    requests were in flight when it stopped, hence a range); rows left in the spool are shown apart."""
    low, high = target["completed"], target["completed"] + target["slack"] + target["errors"]
    bounds = f"{low:,}" if low == high else f"{low:,}..{high:,}"
    rows, spool_only = target["rows"], target.get("spool_only", 0)
    if low <= rows <= high:
        verdict = "ok"
    elif spool_only and low <= rows + spool_only <= high:
        verdict = f"SPOOLED ({spool_only:,} only in spool)"
    else:
        verdict = "MISMATCH" + (f" (+{spool_only:,} in spool)" if spool_only else "")
    catch_up = target.get("catch_up_s")
    if catch_up:  # the writer was behind when the load stopped
        verdict += f" (writer caught up {catch_up:g} s after load)"
    if target.get("replayed"):
        verdict += f" ({target['replayed']:,} written late, through the spool)"
    if target.get("parsed_in_server"):
        verdict += f" ({target['parsed_in_server']:,} parsed in the serving process)"
    return f"{rows:,} / {bounds} {verdict}"


def summarise(target: dict[str, Any], mode: str, direct: dict[str, Any] | None) -> dict[str, Any]:
    """Means over the rounds of one target in one mode, and its latency added over the direct baseline."""
    thr, lat = target["runs"]["thr"], target["runs"]["lat"]
    stream = mode in STREAM_MODES
    latency_key = "event_p50_ms" if stream else "p50_ms"
    latency_p99_key = "event_p99_ms" if stream else "p99_ms"
    out = {
        "name": target["name"],
        "rps": _mean([r["rps"] for r in thr]),
        "rps_rounds": [r["rps"] for r in thr],
        "p50_ms": _mean([r["p50_ms"] for r in thr]),
        "p99_ms": _mean([r["p99_ms"] for r in thr]),
        "lat_p50_ms": _mean([r.get(latency_key) for r in lat]),
        "lat_p99_ms": _mean([r.get(latency_p99_key) for r in lat]),
        "cpu_us_per_req": _mean([r.get("cpu_us_per_req") for r in thr]),
        "background_pct": _mean([r.get("background_pct") for r in thr + lat]),
        "errors": sum(r["errors"] for r in thr + lat),
    }
    out["added_ms"] = None
    if direct is not None and out["lat_p50_ms"] is not None and direct["lat_p50_ms"] is not None:
        out["added_ms"] = out["lat_p50_ms"] - direct["lat_p50_ms"]
    if stream and out["rps"] is not None:
        out["events_per_s"] = out["rps"] * target["events_per_request"]
    return out


def table(mode: str, rows: list[dict[str, Any]], targets: list[dict[str, Any]], connections: int) -> str:
    """The table for one mode (`json`, or a streaming one)."""
    stream = mode in STREAM_MODES
    by_name = {t["name"]: t for t in targets}
    header = [
        "target",
        f"req/s {connections}c (rounds)",
        *(["events/s"] if stream else []),
        f"p50/p99 ms {connections}c",
        "event p50/p99 ms 1c" if stream else "p50/p99 ms 1c",
        "added p50 ms" + (" /event" if stream else ""),
        "CPU µs/req",
        "rows / requests",
        "RSS MiB start→end",
    ]
    lines = [header]
    for row in rows:
        target = by_name[row["name"]]
        rounds = " ".join(_int(v) for v in row["rps_rounds"])
        rows_cell = "-"
        if target.get("rows") is not None:
            rows_cell = rows_verdict(target)
        rss = "-"
        if target.get("rss_start") is not None:
            rss = f"{target['rss_start']:.0f}→{target['rss_end']:.0f}"
        lines.append(
            [
                row["name"],
                f"{_int(row['rps'])} ({rounds})",
                *([_int(row.get("events_per_s"))] if stream else []),
                f"{_fmt(row['p50_ms'], 2)}/{_fmt(row['p99_ms'], 2)}",
                f"{_fmt(row['lat_p50_ms'])}/{_fmt(row['lat_p99_ms'])}",
                _fmt(row["added_ms"]),
                _int(row["cpu_us_per_req"]),
                rows_cell,
                rss,
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


SAME_RELAY_PASSTHROUGH = "passthrough same-relay"  # bench.passthrough --same-relay


def verdicts(mode: str, rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets for each chatledger row, relative to the passthrough of the same run."""
    by_name = {r["name"]: r for r in rows}
    reference = by_name.get("passthrough")
    direct = by_name.get("direct")
    out: list[str] = []
    if reference is None:
        return out
    if direct is not None and direct["rps"] and reference["rps"]:
        ratio = direct["rps"] / max(r["rps"] or 0 for r in rows if r["name"] != "direct")
        flag = "ok" if ratio >= 2 else "WARNING: upstream may be the bottleneck"
        out.append(
            f"[{mode}] upstream direct {direct['rps']:,.0f} req/s = {ratio:.1f}x the fastest proxy ({flag})"
        )
    for row in rows:
        if not row["name"].startswith("chatledger"):
            continue
        parts = []
        if row["rps"] and reference["rps"]:
            ratio = row["rps"] / reference["rps"]
            mark = "PASS" if ratio >= THROUGHPUT_TARGET else "FAIL"
            parts.append(f"throughput {ratio:.2f}x passthrough ({mark}, target ≥ {THROUGHPUT_TARGET})")
        if row["added_ms"] is not None and reference["added_ms"]:
            ratio = row["added_ms"] / reference["added_ms"]
            mark = "PASS" if ratio <= LATENCY_TARGET else "FAIL"
            parts.append(
                f"added p50 {row['added_ms']:.3f} ms = {ratio:.2f}x "
                f"passthrough's {reference['added_ms']:.3f} ms "
                f"({mark}, target ≤ {LATENCY_TARGET})"
            )
        if row["cpu_us_per_req"] and reference["cpu_us_per_req"]:
            parts.append(f"CPU/req {row['cpu_us_per_req'] / reference['cpu_us_per_req']:.2f}x passthrough")
        same_relay = by_name.get(SAME_RELAY_PASSTHROUGH)
        if same_relay is not None and row["rps"] and same_relay["rps"]:
            cpu = ""
            if row["cpu_us_per_req"] and same_relay["cpu_us_per_req"]:
                cpu = f" and CPU/req {row['cpu_us_per_req'] / same_relay['cpu_us_per_req']:.2f}x"
            parts.append(
                f"throughput {row['rps'] / same_relay['rps']:.2f}x{cpu} the passthrough relaying as "
                "chatledger does (the cost of logging alone)"
            )
        out.append(f"[{mode}] {row['name']}: " + "; ".join(parts))
    return out


def stream_parity(results: list[dict[str, Any]]) -> list[str]:
    """Each chatledger's throughput ratio to the passthrough on the Responses and Messages streams, next
    to its ratio on the chat stream: logging those APIs should cost no more than logging chat."""
    ratios: dict[str, dict[str, float]] = {}
    for result in results:
        rows = {row["name"]: row for row in result["summary"]}
        reference = rows.get("passthrough")
        if result["mode"] not in STREAM_MODES or reference is None or not reference["rps"]:
            continue
        for name, row in rows.items():
            if name.startswith("chatledger") and row["rps"]:
                ratios.setdefault(name, {})[result["mode"]] = row["rps"] / reference["rps"]
    out = []
    for name, by_mode in ratios.items():
        chat = by_mode.get("stream")
        for mode in ("responses", "messages"):
            if mode in by_mode:
                versus = f" (chat stream: {chat:.2f}x, difference {by_mode[mode] - chat:+.2f})" if chat else ""
                out.append(f"[{mode}] {name}: throughput {by_mode[mode]:.2f}x passthrough{versus}")
    return out
