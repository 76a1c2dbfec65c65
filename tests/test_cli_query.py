"""The query commands end to end through `chatledger.main`: logs (table, --json, every filter flag, show),
stats, export (CSV and JSON Lines, streamed: memory stays flat at 100k rows), keys label/list, and errors.
Rows are inserted straight into a migrated ledger (tests/querydata.py); SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.cli import commands as cli
from proxy.cli import main
from proxy.credentials import key_fingerprint
from proxy.store.engine import create_engine
from proxy.store.filters import Filters
from proxy.store.migrate import upgrade
from proxy.store.models import ApiKey
from proxy.store.queries import COLUMNS
from proxy.store.stats import fetch_stats

from .querydata import base_time, expected_ids, filter_cases, insert_rows, make_rows, run_cli


class Seeded:
    def __init__(
        self, url: str, engine: AsyncEngine, rows: list[dict[str, Any]], start: datetime, now: datetime
    ) -> None:
        self.url, self.engine, self.rows, self.start, self.now = url, engine, rows, start, now

    def newest(self) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: r["id"], reverse=True)


@pytest.fixture
async def seeded(database_url: str) -> AsyncIterator[Seeded]:
    engine = create_engine(database_url)
    await upgrade(engine)
    now = datetime.now(UTC)
    start = base_time(now)
    rows = make_rows(start=start)
    await insert_rows(engine, rows)
    yield Seeded(database_url, engine, rows, start, now)
    await engine.dispose()


def flags(params: dict[str, Any]) -> list[str]:
    """Query-string filters as command-line flags."""
    out: list[str] = []
    for name, value in params.items():
        if name == "stream":
            out.append("--stream" if value == "true" else "--no-stream")
        elif name == "tag":
            for pair in value:
                out += ["--tag", pair]
        else:
            out += [f"--{name}", value]
    return out


def json_lines(out: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.splitlines()]


async def test_logs_table(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await run_cli(capsys, "logs", "--database", seeded.url)
    lines = out.splitlines()
    assert code == 0
    assert len(lines) == 21
    assert lines[0].split() == [
        "ID",
        "TIME",
        "(UTC)",
        "MODEL",
        "STATUS",
        "TOKENS",
        "IN/OUT",
        "COST",
        "$",
        "FINISH",
        "USER",
    ]
    newest = seeded.newest()
    assert [line.split()[0] for line in lines[1:]] == [row["request_id"][-8:] for row in newest[:20]]
    row = next(r for r in newest[:20] if r["model"] and r["cost"] is not None and r["user"])
    line = next(line for line in lines if line.startswith(row["request_id"][-8:])).split()
    assert line[1:3] == row["started_at"].strftime("%Y-%m-%d %H:%M:%S").split()
    assert line[3] == row["model"]
    assert line[4:6] == [str(row["status_code"]), row["outcome"]]
    assert line[6] == f"{row['prompt_tokens']:,}/{row['completion_tokens']:,}"
    assert line[7] == f"{row['cost']:.6f}"
    assert line[8] == ",".join(c["finish_reason"] for c in row["choices"])
    assert line[9] == row["user"]

    code, out, _ = await run_cli(capsys, "logs", "--database", seeded.url, "-n", "0")
    assert len(out.splitlines()) == len(seeded.rows) + 1
    code, out, _ = await run_cli(capsys, "logs", "--database", seeded.url, "-n", "3", "--user", "nobody")
    assert out.strip() == "no completions match"


async def test_logs_of_every_row_stream_in_pages_newest_first(
    seeded: Seeded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "LOGS_PAGE_ROWS", 3)
    code, out, _ = await run_cli(capsys, "logs", "--database", seeded.url, "-n", "0")
    assert code == 0
    lines = out.splitlines()
    headers = [n for n, line in enumerate(lines) if line.startswith("ID ")]
    assert headers == list(range(0, len(lines), 4))  # a header, then three rows, page after page
    ids = [line.split()[0] for n, line in enumerate(lines) if n not in headers]
    assert ids == [row["request_id"][-8:] for row in seeded.newest()]
    code, out, _ = await run_cli(capsys, "logs", "--database", seeded.url, "-n", "0", "--json")
    assert [r["id"] for r in json_lines(out)] == [r["id"] for r in seeded.newest()]
    code, out, _ = await run_cli(capsys, "logs", "--database", seeded.url, "-n", "0", "--user", "nobody")
    assert out.strip() == "no completions match"


async def test_logs_json_has_every_column_and_choices(
    seeded: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run_cli(capsys, "logs", "--database", seeded.url, "--json", "-n", "7")
    found = json_lines(out)
    assert code == 0
    assert [r["id"] for r in found] == [r["id"] for r in seeded.newest()[:7]]
    by_id = {row["id"]: row for row in seeded.rows}
    for item in found:
        source = by_id[item["id"]]
        assert set(item) == set(COLUMNS) | {"choices"}
        assert item["request_id"] == source["request_id"]
        assert datetime.fromisoformat(item["started_at"]) == source["started_at"]
        assert item["started_at"].endswith("Z")
        assert item["tags"] == source["tags"]
        assert item["usage"] == source["usage"]
        assert item["cost"] == (float(source["cost"]) if source["cost"] is not None else None)
        assert item["choices"] == source["choices"]


async def test_every_filter_flag(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    for case in filter_cases(seeded.start, seeded.now):
        code, out, err = await run_cli(
            capsys, "logs", "--database", seeded.url, "--json", "-n", "0", *flags(case.params)
        )
        assert code == 0, (case.name, err)
        assert [r["id"] for r in json_lines(out)] == expected_ids(seeded.rows, case), case.name


async def test_logs_show(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    target = next(row for row in seeded.rows if len(row["choices"]) == 2 and row["tags"])
    request_id = target["request_id"]
    for ident in (request_id, target["completion_id"], request_id[-8:], request_id[:8]):
        code, out, _ = await run_cli(capsys, "logs", "show", ident, "--database", seeded.url)
        assert code == 0
        fields = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("choice"))
        assert fields["request_id"] == target["request_id"]
        assert fields["model"] == target["model"]
        assert orjson.loads(fields["tags"]) == target["tags"]
        assert [line.split()[:2] for line in out.splitlines() if line.startswith("choice")] == [
            ["choice", "0"],
            ["choice", "1"],
        ]
    code, out, _ = await run_cli(
        capsys, "logs", "show", target["request_id"], "--database", seeded.url, "--json"
    )
    [item] = json_lines(out)
    assert item["id"] == target["id"]
    assert len(item["choices"]) == 2

    code, out, err = await run_cli(capsys, "logs", "show", "does-not-exist", "--database", seeded.url)
    assert code == 1
    assert "does-not-exist" in err
    assert out == ""
    code, _, err = await run_cli(capsys, "logs", "show", "--database", seeded.url)
    assert code == 2
    assert "logs show" in err


async def test_stats(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    async with seeded.engine.connect() as conn:
        direct = await fetch_stats(conn, "user", Filters(stream=False))
    code, out, _ = await run_cli(
        capsys, "stats", "--by", "user", "--no-stream", "--database", seeded.url, "--json"
    )
    result = orjson.loads(out)
    assert code == 0
    assert result["by"] == "user"
    assert [r["key"] for r in result["rows"]] == [r.key for r in direct.rows]
    assert [r["requests"] for r in result["rows"]] == [r.requests for r in direct.rows]
    assert [r["p95_ms"] for r in result["rows"]] == [r.p95_ms for r in direct.rows]
    assert result["totals"]["requests"] == sum(1 for r in seeded.rows if not r["stream"])

    code, out, _ = await run_cli(capsys, "stats", "--database", seeded.url)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "REQUESTS", "ERRORS"]
    assert lines[-2].split()[:2] == ["total", f"{len(seeded.rows):,}"]
    assert set(lines[-3]) == {"-", " "}
    assert lines[-1].startswith("p50/p95 from the rollups' duration histograms, ±15%")

    # --exact reads the rows: exact percentiles, no note; the same sums
    code, out, _ = await run_cli(capsys, "stats", "--exact", "--database", seeded.url, "--json")
    exact = orjson.loads(out)
    assert exact["percentiles"] == "exact"
    code, out, _ = await run_cli(capsys, "stats", "--database", seeded.url, "--json")
    rollup = orjson.loads(out)
    assert rollup["percentiles"].startswith("±15%")
    for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "unknown_cost"):
        assert [r[name] for r in rollup["rows"]] == [r[name] for r in exact["rows"]], name
    code, out, _ = await run_cli(capsys, "stats", "--exact", "--database", seeded.url)
    assert out.splitlines()[-1].split()[:2] == ["total", f"{len(seeded.rows):,}"]

    code, _, err = await run_cli(capsys, "stats", "--by", "weekday", "--database", seeded.url)
    assert code == 2
    assert "--by" in err


async def test_export_csv_and_jsonl(
    seeded: Seeded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = sorted((r for r in seeded.rows if r["user"] == "user-1"), key=lambda r: r["id"])
    target = tmp_path / "out.csv"
    code, _, err = await run_cli(
        capsys, "export", "--format", "csv", "-o", str(target), "--user", "user-1", "--database", seeded.url
    )
    assert code == 0
    assert f"exported {len(expected)} completion(s)" in err
    with target.open(newline="") as handle:
        found = list(csv.DictReader(handle))
    assert list(found[0]) == [*COLUMNS, "finish_reasons"]
    assert [int(r["id"]) for r in found] == [r["id"] for r in expected]
    for row, source in zip(found, expected, strict=True):
        assert row["request_id"] == source["request_id"]
        assert datetime.fromisoformat(row["started_at"]) == source["started_at"]
        assert row["stream"] == ("true" if source["stream"] else "false")
        assert (Decimal(row["cost"]) if row["cost"] else None) == source["cost"]
        assert (orjson.loads(row["tags"]) if row["tags"] else None) == source["tags"]
        assert row["finish_reasons"] == ",".join(c["finish_reason"] for c in source["choices"])
        assert row["model"] == (source["model"] or "")

    code, out, _ = await run_cli(
        capsys, "export", "--user", "user-1", "--database", seeded.url
    )  # jsonl, stdout
    items = json_lines(out)
    assert [item["id"] for item in items] == [r["id"] for r in expected]
    assert [item["choices"] for item in items] == [r["choices"] for r in expected]


FILL_SQLITE = """
WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < :rows)
INSERT INTO completions (request_id, started_at, duration_ms, method, path, upstream, status_code, outcome,
                         stream, requested_model, model, prompt_tokens, completion_tokens, cost, cost_source,
                         usage, tags, user, error)
SELECT printf('req-%08d', n), '2026-01-01 00:00:00.000000', n % 997, 'POST', '/v1/chat/completions',
       'https://openrouter.ai', 200, 'ok', 0, 'gpt-4o', 'gpt-4o-2024-08-06', 1000 + n % 100, 100, 0.001234,
       'pricing',
       '{"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}', '{"team": "search"}',
       'user-' || (n % 50), printf('%.200c', 'x')
FROM seq
"""


async def _peak(url: str, rows: int, target: Path, *command: str) -> int:
    """Peak traced memory of `chatledger COMMAND` over a ledger of `rows` rows; what it prints goes to
    `target` (a file, so the output does not count)."""
    engine = create_engine(url)
    await upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(text(FILL_SQLITE), {"rows": rows})
        await conn.execute(
            text(
                'INSERT INTO completion_choices (completion_pk, "index", finish_reason, role) '
                "SELECT id, 0, 'stop', 'assistant' FROM completions"
            )
        )
    await engine.dispose()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with target.open("w") as out, contextlib.redirect_stdout(out):
            code = await asyncio.to_thread(main, [*command, "--database", url])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0
    with target.open("rb") as handle:
        assert sum(1 for _ in handle) == rows
    return peak


@pytest.mark.slow
@pytest.mark.parametrize("command", [("export", "--format", "jsonl"), ("logs", "-n", "0", "--json")])
async def test_every_row_streams_in_bounded_memory(tmp_path: Path, command: tuple[str, ...]) -> None:
    small = await _peak(f"sqlite+aiosqlite:///{tmp_path / 'small.db'}", 10_000, tmp_path / "small.jsonl", *command)
    large = await _peak(f"sqlite+aiosqlite:///{tmp_path / 'large.db'}", 100_000, tmp_path / "large.jsonl", *command)
    size = (tmp_path / "large.jsonl").stat().st_size
    assert size > 80 * 2**20  # the whole export, held in memory, would need well over this
    assert large < 40 * 2**20, large
    assert large < small * 1.5 + 4 * 2**20, (small, large)  # ten times the rows, about the same peak


async def test_keys_label_and_list(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "sk-live-a-real-looking-secret-4242"
    fingerprint = key_fingerprint(secret)
    code, out, _ = await run_cli(capsys, "keys", "label", secret, "team-new", "--database", seeded.url)
    assert code == 0
    assert fingerprint in out
    assert secret not in out
    other = key_fingerprint("sk-gamma-0003")  # in the seeded rows
    code, out, _ = await run_cli(
        capsys, "keys", "label", other, "team-gamma", "--database", seeded.url, "--json"
    )
    assert orjson.loads(out) == {"api_key_hash": other, "label": "team-gamma"}
    code, _, _ = await run_cli(capsys, "keys", "label", other, "team-gamma-2", "--database", seeded.url)
    async with seeded.engine.connect() as conn:
        stored = (await conn.execute(select(ApiKey.api_key_hash, ApiKey.label))).all()
        dump = " ".join(str(v) for row in stored for v in row)
    assert secret not in dump
    assert (fingerprint, "team-new") in stored
    assert (other, "team-gamma-2") in stored

    code, out, _ = await run_cli(capsys, "keys", "list", "--database", seeded.url, "--json")
    listed = {item["api_key_hash"]: item for item in json_lines(out)}
    assert listed[fingerprint]["requests"] == 0
    assert listed[other]["label"] == "team-gamma-2"
    assert listed[other]["requests"] == sum(1 for r in seeded.rows if r["api_key_hash"] == other)

    code, out, _ = await run_cli(
        capsys, "logs", "--key", "team-gamma-2", "-n", "0", "--json", "--database", seeded.url
    )
    assert {item["api_key_hash"] for item in json_lines(out)} == {other}
    code, _, err = await run_cli(capsys, "keys", "label", secret, "  ", "--database", seeded.url)
    assert code == 2
    assert "label" in err


async def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.db"
    code, out, err = await run_cli(capsys, "logs", "--database", str(missing))
    assert code == 1
    assert out == ""
    assert str(missing) in err
    assert len(err.splitlines()) == 1
    assert not missing.exists()  # reading never creates a ledger
    code, _, err = await run_cli(capsys, "logs", "--database", str(missing), "--since", "last tuesday")
    assert code == 2
    assert "--since" in err
    code, _, err = await run_cli(capsys, "stats", "--database", str(missing), "--status", "abc")
    assert code == 2
    assert "--status" in err
    code, _, err = await run_cli(capsys, "logs", "--database", str(missing), "-n", "-1")
    assert code == 2
    assert "--limit" in err
