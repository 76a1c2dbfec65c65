"""Human-readable output of the query commands (tables), and the CSV / JSON Lines export writer."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TextIO

from sqlalchemy.ext.asyncio import AsyncEngine

from ..store.filters import Filters
from ..store.pricing.book import RATE_FIELDS, PriceEntry
from ..store.queries import COLUMNS, iter_completions, short_id, to_json
from ..store.retention import PruneReport
from ..store.stats import Stats, StatsRow
from .escape import csv_cell, terminal_text

MAX_CELL = 40


def _cell(value: Any, width: int = MAX_CELL) -> str:
    text = "" if value is None else terminal_text(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    right: Sequence[int] = (),
    footer: Sequence[Any] | None = None,
) -> str:
    """Columns sized to their content; `right` lists the columns aligned right (numbers)."""
    body = [[_cell(v) for v in row] for row in rows]
    tail = [_cell(v) for v in footer] if footer is not None else None
    widths = [len(h) for h in headers]
    for row in [*body, *([tail] if tail else [])]:
        widths = [max(w, len(v)) for w, v in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), *(line(row) for row in body)]
    if tail is not None:
        out += [line(["-" * w for w in widths]), line(tail)]
    return "\n".join(out)


def money(value: Decimal | None, places: int = 6) -> str:
    if value is None:
        return "-"
    if 0 < value < Decimal(1).scaleb(-places):
        return f"{value:.2e}"
    return f"{value:,.{places}f}"


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else ""


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def format_logs(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "no completions match"
    headers = ("ID", "TIME (UTC)", "MODEL", "STATUS", "TOKENS IN/OUT", "COST $", "FINISH", "USER")
    lines = []
    for row in rows:
        status = f"{row['status_code'] or '-'} {row['outcome']}"
        tokens = f"{_count(row['prompt_tokens'])}/{_count(row['completion_tokens'])}"
        finish = ",".join(str(ch["finish_reason"]) for ch in row["choices"] if ch["finish_reason"])
        lines.append(
            (
                short_id(row["request_id"]),
                when(row["started_at"]),
                row["model"] or row["requested_model"],
                status,
                tokens,
                money(row["cost"]),
                finish,
                row["user"],
            )
        )
    return table(headers, lines, right=(4, 5))


def format_completion(row: dict[str, Any]) -> str:
    """Every non-empty column, one per line, then the choices."""
    width = max(len(name) for name in COLUMNS)
    lines = []
    for name in COLUMNS:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, dict | list):
            value = to_json(value).decode()
        elif name == "cost":
            value = f"{value:f} ({row.get('cost_source')})"
        lines.append(f"{name:<{width}}  {terminal_text(value)}")
    for choice in row["choices"]:
        detail = ", ".join(f"{k}={v}" for k, v in choice.items() if k != "index" and v is not None)
        lines.append(f"{'choice ' + str(choice['index']):<{width}}  {terminal_text(detail)}")
    return "\n".join(lines)


def _stats_cells(row: StatsRow, key: str) -> list[Any]:
    seconds = [f"{v / 1000:.2f}" if v is not None else "-" for v in (row.p50_ms, row.p95_ms)]
    return [
        key,
        f"{row.requests:,}",
        f"{row.errors:,}",
        f"{row.prompt_tokens:,}",
        f"{row.completion_tokens:,}",
        f"{row.cached_tokens:,}",
        f"{row.reasoning_tokens:,}",
        money(row.cost, 4),
        f"{row.unknown_cost:,}",
        *seconds,
    ]


def format_stats(stats: Stats) -> str:
    if not stats.rows:
        return "no completions match"
    headers = (
        stats.by.upper(),
        "REQUESTS",
        "ERRORS",
        "PROMPT",
        "COMPLETION",
        "CACHED",
        "REASONING",
        "COST $",
        "UNKNOWN COST",
        "P50 s",
        "P95 s",
    )

    def name(row: StatsRow) -> str:
        key = "(none)" if row.key is None else str(row.key)
        return f"{row.label} ({key})" if row.label else key

    lines = [_stats_cells(row, name(row)) for row in stats.rows]
    text = table(headers, lines, right=tuple(range(1, 11)), footer=_stats_cells(stats.totals, "total"))
    if stats.percentiles != "exact":
        text += f"\np50/p95 from the rollups' duration histograms, {stats.percentiles}; --exact reads the rows"
    return text


def _rate(value: Decimal | None) -> str:
    return "-" if value is None else f"{value.normalize():f}"


def format_prices(entries: Sequence[PriceEntry]) -> str:
    if not entries:
        return "no prices known (add [pricing.models] to the config or run `chatledger prices sync`)"
    headers = (
        "MODEL",
        "PROMPT",
        "COMPLETION",
        "CACHE READ",
        "CACHE WRITE",
        "REASONING",
        "SOURCE",
        "SINCE (UTC)",
    )
    rows = [
        (e.model, *(_rate(getattr(e, n)) for n in RATE_FIELDS), e.source, when(e.effective_from))
        for e in entries
    ]
    return table(headers, rows, right=(1, 2, 3, 4, 5)) + "\n(USD per million tokens)"


def format_keys(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "no labelled keys (chatledger keys label <sk-...|fingerprint> NAME)"
    headers = ("FINGERPRINT", "LABEL", "REQUESTS", "LAST SEEN (UTC)", "LABELLED (UTC)")
    lines = [
        (r["api_key_hash"], r["label"], f"{r['requests']:,}", when(r["last_seen"]), when(r["created_at"]))
        for r in rows
    ]
    return table(headers, lines, right=(2,))


def _bytes(size: int) -> str:
    if size < 1024:
        return f"{size:,} bytes"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} GiB"


def format_prune(report: PruneReport, *, sqlite: bool) -> str:
    day = report.cut.date().isoformat()
    if report.dry_run:
        return (
            f"would delete {report.rows:,} row(s) and {report.choices:,} choice(s) of calls before {day} (UTC); "
            f"counted in {report.seconds:.1f} s"
        )
    lines = [
        f"deleted {report.rows:,} row(s) and {report.choices:,} choice(s) of calls before {day} (UTC)",
        f"{report.batches:,} batch(es), longest {report.longest_batch_ms:,.0f} ms; {report.seconds:.1f} s",
    ]
    if report.space_returned is not None:
        lines.append(f"returned {_bytes(report.space_returned)} to the file system")
    elif sqlite and report.rows:
        lines.append(
            "the file keeps its size (freed pages are reused): it was created without auto_vacuum incremental, "
            "which one VACUUM switches on (docs/reliability.md, Retention)"
        )
    elif not sqlite and report.rows:
        lines.append("PostgreSQL reuses the freed space after autovacuum; the files do not shrink")
    return "\n".join(lines)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        return csv_cell(to_json(value).decode())
    if isinstance(value, str):
        return csv_cell(value)
    return value


async def export_rows(engine: AsyncEngine, filters: Filters, fmt: str, out: TextIO, *, limit: int = 0) -> int:
    """Write matching completions oldest first; rows are streamed, never all held in memory."""
    count = 0
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow([*COLUMNS, "finish_reasons"])
    async for row in iter_completions(engine, filters, limit=limit):
        if writer is not None:
            finish = csv_cell(",".join(str(ch["finish_reason"] or "") for ch in row["choices"]))
            writer.writerow([*(_csv_value(row[name]) for name in COLUMNS), finish])
        else:
            out.write(to_json(row).decode() + "\n")
        count += 1
    out.flush()
    return count
