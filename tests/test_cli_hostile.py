"""Hostile logged values through the CLI: a `user`, a model, tags and upstream error text carrying
terminal escapes, carriage returns and bidi controls are logged through the proxy, then printed by every
human-readable command with those characters escaped; CSV export neutralises formula cells (OWASP) and
JSON Lines export stays exact. Also: filter values are validated (CLI exit 2, HTTP 400), an ambiguous
short id is reported (CLI exit 2, HTTP 409), `export | head` exits quietly, and `prices sync` names the
reload interval. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.cli.escape import csv_cell, terminal_text
from proxy.parse.record import OUTCOMES

from .conftest import Ledger
from .payloads import OPENAI_BASIC
from .querydata import run_cli
from .test_cli import chatledger_command, clean_env
from .upstream import FakeUpstream, json_reply

RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # all but \n
HOSTILE_USER = '=HYPERLINK("http://evil.example","x")\x1b]0;pwned\x07\x1b[2J\rFORGED\u202eevil'
HOSTILE_MODEL = "gpt-4o\x1b[31m\x9b2J\u2066"
HOSTILE_ERROR = "bad request\x1b[H\x1b[2J\r\nchatledger: all good\x08\x08"
HOSTILE_TAG = "-2+3\u202eevil"  # HTTP clients refuse C0 controls in header values; bidi controls pass


async def log_hostile_calls(ledger: Ledger, upstream: FakeUpstream) -> list[dict[str, object]]:
    upstream.add("evil_model", json_reply({**OPENAI_BASIC, "model": HOSTILE_MODEL}))
    upstream.add("evil_error", json_reply({"error": {"message": HOSTILE_ERROR, "type": "x"}}, status=400))
    async with aiohttp.ClientSession() as session:
        for scenario in ("evil_model", "evil_error"):
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "user": HOSTILE_USER}
            headers = {
                "Authorization": "Bearer sk-hostile-0123456789",
                "X-Fake-Scenario": scenario,
                "X-Ledger-Tags": f"team={HOSTILE_TAG}",
            }
            async with session.post(
                ledger.url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
            ) as response:
                await response.read()
    rows = await ledger.rows(count=2)
    assert {row["user"] for row in rows} == {HOSTILE_USER}
    assert HOSTILE_MODEL in {row["model"] for row in rows}
    assert any(HOSTILE_ERROR in (row["error"] or "") for row in rows)
    assert {row["tags"]["team"] for row in rows} == {HOSTILE_TAG}
    return rows


def test_terminal_text_and_csv_cell() -> None:
    assert terminal_text("a\x1b[2Jb\rc\nd\u202e") == "a\\x1b[2Jb\\rc\\nd\\u202e"
    assert terminal_text("plain text, ünïcode ✓") == "plain text, ünïcode ✓"
    for start in ("=", "+", "-", "@", "\t", "\r"):
        assert csv_cell(start + "1") == "'" + start + "1"
    assert csv_cell("gpt-4o") == "gpt-4o"


async def test_human_output_escapes_hostile_logged_values(
    ledger: Ledger, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = await log_hostile_calls(ledger, upstream)
    url = ledger.config.database.url
    outputs = []
    for argv in (
        ("logs",),
        ("logs", "--user", HOSTILE_USER),
        ("logs", "show", rows[1]["request_id"]),
        ("stats", "--by", "user"),
        ("stats", "--by", "model"),
        ("stats", "--by", "tag:team"),
        ("db", "status"),
    ):
        code, out, err = await run_cli(capsys, *argv, "--database", url)
        assert code == 0, (argv, err)
        assert not RAW_CONTROL.search(out), (argv, out)
        outputs.append(out)
    logs, _, show, by_user, by_model, by_tag, _ = outputs
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\rFORGED\\u202eevil" in show
    assert "\\x1b[H\\x1b[2J\\r\\nchatledger: all good" in show  # one line: a forged line stays in its field
    assert not any(line.startswith("chatledger: all good") for line in show.splitlines())
    assert "gpt-4o\\x1b[31m\\x9b2J\\u2066" in by_model
    assert terminal_text(HOSTILE_USER)[:39] in by_user  # cells are cut at 40 characters
    assert "-2+3\\u202eevil" in by_tag
    assert len(logs.splitlines()) == 3  # header and two rows: no forged lines

    # an error message quoting a hostile argument is escaped too
    code, _, err = await run_cli(capsys, "logs", "show", "\x1b[2Jnope", "--database", url)
    assert code == 1
    assert "\x1b" not in err


async def test_csv_export_neutralises_formulas_and_jsonl_stays_exact(
    ledger: Ledger, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    await log_hostile_calls(ledger, upstream)
    url = ledger.config.database.url
    code, out, err = await run_cli(capsys, "export", "--format", "csv", "--database", url)
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert len(table) == 2
    for row in table:
        assert row["user"] == "'" + HOSTILE_USER
        assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row.values() if cell), row
    code, out, err = await run_cli(capsys, "export", "--format", "jsonl", "--database", url)
    assert code == 0, err
    exported = [orjson.loads(line) for line in out.splitlines()]
    assert {row["user"] for row in exported} == {HOSTILE_USER}
    assert HOSTILE_MODEL in {row["model"] for row in exported}
    assert {row["tags"]["team"] for row in exported} == {HOSTILE_TAG}


# ---- filter validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "param"),
    [
        (("--outcome", "bogus"), "outcome"),
        (("--api", "bogus"), "api"),
        (("--status", "2000"), "status"),
        (("--status", "ok"), "status"),
        (("--since", "yesterday-ish"), "since"),
    ],
)
async def test_bad_filter_values_are_refused(
    ledger: Ledger, flags: tuple[str, str], param: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ledger.config.database.url
    for command in ("logs", "stats", "export"):
        code, out, err = await run_cli(capsys, command, *flags, "--database", url)
        assert code == 2, (command, err)
        assert err.startswith(f"chatledger: --{param}:"), err
        assert out == ""
    async with (
        aiohttp.ClientSession() as session,
        session.get(ledger.url + "/_ledger/api/completions", params={param: flags[1]}) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"]["param"] == param


async def test_every_documented_outcome_is_accepted_and_matches_the_schema_doc(
    ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = (Path(__file__).parent.parent / "docs" / "reference" / "schema.md").read_text()
    section = schema[schema.index("### Outcomes") :]
    section = section[: section.index("\n## ")]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)[1:]  # after the header row
    assert tuple(documented) == OUTCOMES
    for outcome in OUTCOMES:
        code, _, err = await run_cli(capsys, "logs", "--outcome", outcome, "--database", ledger.config.database.url)
        assert code == 0, err


async def test_stream_flag_takes_no_value(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as raised:
        await run_cli(capsys, "logs", "--stream=maybe", "--database", str(tmp_path / "x.db"))
    assert raised.value.code == 2


# ---- logs show with a prefix -----------------------------------------------------------------------------


async def test_an_ambiguous_prefix_is_reported_not_printed(
    ledger: Ledger, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(
                ledger.url + "/v1/chat/completions",
                data=orjson.dumps({"model": "gpt-4o", "messages": []}),
                headers={"Authorization": "Bearer sk-x"},
            ) as response:
                await response.read()
    rows = await ledger.rows(count=3)
    ids = [row["request_id"] for row in rows]
    common = 0
    while all(i[common] == ids[0][common] for i in ids):
        common += 1
    prefix = ids[0][: max(common, 6)]
    url = ledger.config.database.url
    matching = [i for i in ids if i.startswith(prefix)]
    assert len(matching) > 1  # UUIDv7: calls in the same millisecond-range share their first characters
    code, out, err = await run_cli(capsys, "logs", "show", prefix, "--database", url)
    assert code == 2, err
    assert out == ""
    assert f"matches {len(matching)} request ids" in err
    assert "give more characters" in err
    # a unique prefix and the short id `logs` prints each find exactly one
    for ident in (ids[0][:30], ids[0][-8:]):
        code, out, err = await run_cli(capsys, "logs", "show", ident, "--json", "--database", url)
        assert code == 0, err
        assert [orjson.loads(line)["request_id"] for line in out.splitlines()] == [ids[0]]
    async with aiohttp.ClientSession() as session:
        async with session.get(ledger.url + f"/_ledger/api/completions/{prefix}") as response:
            assert response.status == 409
            assert (await response.json())["error"]["code"] == "ambiguous"
        async with session.get(ledger.url + f"/_ledger/api/completions/{ids[0][:30]}") as response:
            assert response.status == 200
            assert (await response.json())["request_id"] == ids[0]
        async with session.get(ledger.url + f"/_ledger/requests/{prefix}") as response:  # the dashboard lists them
            assert response.status == 300
            page = await response.text()
            assert all(request_id in page for request_id in matching)


# ---- export | head ---------------------------------------------------------------------------------------


async def test_export_into_a_closed_pipe_exits_quietly(ledger: Ledger, upstream: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            async with session.post(
                ledger.url + "/v1/chat/completions",
                data=orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 2000}]}),
                headers={"Authorization": "Bearer sk-x"},
            ) as response:
                await response.read()
    await ledger.rows(count=50)
    database = ledger.config.database.url
    command = " ".join(chatledger_command()) + f" export --format jsonl --database '{database}' | head -c 100"
    process = await asyncio.create_subprocess_shell(
        f"set -o pipefail; {command}",
        executable="/bin/bash",
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert len(stdout) == 100
    assert stderr.decode() == ""
    assert process.returncode == 0


# ---- prices sync ------------------------------------------------------------------------------------------


async def test_prices_sync_says_when_a_running_server_applies_the_prices(
    upstream: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = {"data": [{"id": "m/one", "pricing": {"prompt": "0.000001", "completion": "0.000002"}}]}
    upstream.add("models", json_reply(models))
    upstream.default = "models"
    code, out, err = await run_cli(
        capsys, "prices", "sync", "--upstream", upstream.url, "--database", str(tmp_path / "ledger.db")
    )
    assert code == 0, err
    assert "within 60 s (pricing.reload_interval)" in out
