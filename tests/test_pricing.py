"""Prices and cost: the arithmetic (cache read/write, reasoning), matching (exact, glob, provider prefix),
price history, prices recorded from the config, `prices sync` against a fake models endpoint, the running
proxy pricing real calls, and `reprice`. Database tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from sqlalchemy import insert, select

from proxy.config import ModelPrice
from proxy.parse.record import CompletionRecord
from proxy.store.engine import create_engine
from proxy.store.migrate import upgrade
from proxy.store.models import Price, completions_table
from proxy.store.pricing.book import PriceBook, PriceEntry, compute_cost
from proxy.store.pricing.openrouter import parse_openrouter_models
from proxy.store.pricing.pricer import Pricer
from proxy.store.pricing.table import load_entries, store_prices
from proxy.web.appkeys import PRICER

from .conftest import make_config, start_ledger
from .payloads import OPENAI_BASIC, OPENAI_TOOL_CALLS, OPENROUTER_WITH_COST
from .querydata import run_cli
from .upstream import FakeUpstream, json_reply

D = Decimal
T0 = datetime(2026, 1, 1, tzinfo=UTC)
MILLION = D(1_000_000)


def entry(
    model: str, prompt: str, completion: str, when: datetime = T0, source: str = "config", **rates: str
) -> PriceEntry:
    return PriceEntry(
        model, when, D(prompt), D(completion), **{k: D(v) for k, v in rates.items()}, source=source
    )


# ---- arithmetic -------------------------------------------------------------------------------


def test_cached_tokens_are_billed_at_the_cache_rate_not_twice() -> None:
    price = entry("gpt-4o", "2.5", "10", cache_read="1.25")
    cost = compute_cost(price, 1117, 46, cached_tokens=1024)
    assert cost == (93 * D("2.5") + 1024 * D("1.25") + 46 * 10) / MILLION == D("0.0019725")


def test_cached_tokens_without_a_cache_price_cost_the_prompt_rate() -> None:
    assert compute_cost(entry("m", "2.5", "10"), 1117, 46, cached_tokens=1024) == D("0.0032525")


def test_cache_write_tokens_at_their_rate_when_priced() -> None:
    sonnet = entry("s", "3", "15", cache_read="0.3", cache_write="3.75")
    assert (
        compute_cost(sonnet, 2400, 120, 2048, 100, 40)
        == (252 * 3 + 2048 * D("0.3") + 100 * D("3.75") + 120 * 15) / MILLION
    )
    unpriced_write = entry("s", "3", "15", cache_read="0.3")
    assert (
        compute_cost(unpriced_write, 2400, 120, 2048, 100, 40)
        == (352 * 3 + 2048 * D("0.3") + 120 * 15) / MILLION
    )


def test_reasoning_tokens_move_to_their_rate_only_when_priced_separately() -> None:
    assert (
        compute_cost(entry("o", "1", "4", reasoning="8"), 10, 120, reasoning_tokens=40)
        == (10 + 80 * 4 + 40 * 8) / MILLION
    )
    assert compute_cost(entry("o", "1", "4"), 10, 120, reasoning_tokens=40) == (10 + 120 * 4) / MILLION


def test_unknown_tokens_mean_unknown_cost_and_zero_means_zero() -> None:
    price = entry("m", "1", "2")
    assert compute_cost(price, None, None) is None
    assert compute_cost(price, 10, None) is None
    assert compute_cost(price, 0, 0) == 0


def test_exact_decimal_arithmetic_and_clamping() -> None:
    assert compute_cost(ModelPrice(D("0.15"), D("0.6")), 7, 0) == D("0.00000105")
    assert str(compute_cost(ModelPrice(D("0.15"), D("0.6")), 7, 0)) == "0.00000105"
    # more cached than prompt tokens (a confused upstream): never negative, never billed twice
    assert compute_cost(entry("m", "2", "4", cache_read="1"), 10, 0, cached_tokens=50) == D(10) / MILLION


# ---- matching and history -----------------------------------------------------------------------

BOOK = PriceBook(
    [
        entry("gpt-4o", "2.5", "10"),
        entry("gpt-4o*", "5", "15"),
        entry("gpt-4o-mini*", "0.15", "0.6"),
        entry("openai/gpt-4.1", "2", "8", source="openrouter"),
        entry("meta/llama", "1", "1", source="openrouter"),
        entry("aaa/llama", "0.5", "0.5", source="openrouter"),
        entry("anthropic/claude-sonnet-4", "3", "15", source="openrouter"),
    ]
)


@pytest.mark.parametrize(
    ("model", "requested", "prompt"),
    [
        ("gpt-4o", None, "2.5"),  # exact beats the glob that also matches
        ("gpt-4o-2024-08-06", None, "5"),  # glob
        ("gpt-4o-mini-2024-07-18", None, "0.15"),  # the longest matching glob wins
        ("openai/gpt-4o", None, "2.5"),  # provider prefix stripped
        ("openrouter/openai/gpt-4.1", None, "2"),  # stripped one segment at a time
        ("gpt-4.1", None, "2"),  # provider prefix added: an `openai/gpt-4.1` entry prices a `gpt-4.1` call
        ("llama", None, "0.5"),  # several providers: the alphabetically first
        (None, "gpt-4o", "2.5"),  # no model reported: the requested one
        ("some-custom-name", "gpt-4o", "2.5"),  # reported model unknown: the requested one
        ("claude-sonnet-4", None, "3"),
    ],
)
def test_matching(model: str | None, requested: str | None, prompt: str) -> None:
    price = BOOK.price_for(model, requested, T0)
    assert price is not None
    assert price.prompt == D(prompt)


@pytest.mark.parametrize(
    ("model", "requested"),
    [
        ("unknown", None),
        (None, None),
        ("x/unknown", "also-unknown"),
        ("anthropic/claude-sonnet-4-extra", None),
    ],
)
def test_no_price(model: str | None, requested: str | None) -> None:
    assert BOOK.price_for(model, requested, T0) is None


def test_price_history_uses_the_price_in_effect() -> None:
    t1, t2, t3 = T0, T0 + timedelta(days=10), T0 + timedelta(days=20)
    book = PriceBook([entry("m", "1", "1", t1), entry("m", "3", "3", t3), entry("m", "2", "2", t2)])

    def prompt_at(when: datetime) -> Decimal:
        price = book.price_for("m", None, when)
        assert price is not None
        return price.prompt

    assert prompt_at(t1 - timedelta(days=1)) == 1  # before the first known price: the first price
    assert prompt_at(t1) == 1
    assert prompt_at(t2 - timedelta(microseconds=1)) == 1
    assert prompt_at(t2) == 2
    assert prompt_at(t3 + timedelta(days=300)) == 3


def test_config_prices_take_precedence_over_synced_ones() -> None:
    book = PriceBook(
        [entry("m", "9", "9", T0 + timedelta(days=5), source="openrouter"), entry("m", "1", "1", T0)]
    )
    for when in (T0, T0 + timedelta(days=6)):
        price = book.price_for("m", None, when)
        assert price is not None
        assert price.source == "config"
        assert price.prompt == 1


def record(**fields: Any) -> CompletionRecord:
    base = {
        "request_id": "r",
        "started_at": T0,
        "method": "POST",
        "path": "/v1/chat/completions",
        "upstream": "u",
    }
    return CompletionRecord(**{**base, **fields})


def test_apply_fills_only_unpriced_records() -> None:
    upstream_cost = record(
        model="gpt-4o", prompt_tokens=10, completion_tokens=1, cost=D("0.5"), cost_source="upstream"
    )
    priced = record(model="gpt-4o", prompt_tokens=1000, completion_tokens=100)
    unknown_model = record(model="mystery", prompt_tokens=1000, completion_tokens=100)
    no_usage = record(model="gpt-4o")
    BOOK.apply([upstream_cost, priced, unknown_model, no_usage])
    assert (upstream_cost.cost, upstream_cost.cost_source) == (D("0.5"), "upstream")
    assert (priced.cost, priced.cost_source) == ((1000 * D("2.5") + 100 * 10) / MILLION, "pricing")
    assert (unknown_model.cost, unknown_model.cost_source) == (None, None)
    assert (no_usage.cost, no_usage.cost_source) == (None, None)


MODELS_PAYLOAD: dict[str, Any] = {
    "data": [
        {
            "id": "openai/gpt-4o",
            "name": "GPT-4o",
            "pricing": {
                "prompt": "0.0000025",
                "completion": "0.00001",
                "input_cache_read": "0.00000125",
                "input_cache_write": "0",
                "internal_reasoning": "0",
                "request": "0",
                "image": "0.003613",
            },
        },
        {
            "id": "anthropic/claude-sonnet-4",
            "pricing": {
                "prompt": "0.000003",
                "completion": "0.000015",
                "input_cache_read": "0.0000003",
                "input_cache_write": "0.00000375",
            },
        },
        {
            "id": "openai/o3",
            "pricing": {"prompt": "0.000002", "completion": "0.000008", "internal_reasoning": "0.000008"},
        },
        {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
        {"id": "meta-llama/llama-3.3-70b-instruct:free", "pricing": {"prompt": "0", "completion": "0"}},
        {"id": "broken/no-pricing"},
        {"id": "broken/bad-number", "pricing": {"prompt": "cheap", "completion": "0.1"}},
        {"pricing": {"prompt": "0.1", "completion": "0.1"}},
        "not an object",
    ]
}


def test_parse_openrouter_models() -> None:
    prices = parse_openrouter_models(MODELS_PAYLOAD)
    assert prices == {
        "openai/gpt-4o": ModelPrice(D("2.5"), D(10), cache_read=D("1.25")),
        "anthropic/claude-sonnet-4": ModelPrice(D(3), D(15), cache_read=D("0.3"), cache_write=D("3.75")),
        "openai/o3": ModelPrice(D(2), D(8), reasoning=D(8)),
        "meta-llama/llama-3.3-70b-instruct:free": ModelPrice(D(0), D(0)),
    }
    assert parse_openrouter_models({"data": "nope"}) == {}
    assert parse_openrouter_models([]) == {}


# ---- the prices table ---------------------------------------------------------------------------


async def test_store_prices_inserts_only_changes(database_url: str) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    try:
        first = {"a": ModelPrice(D(1), D(2)), "b": ModelPrice(D("0.5"), D(1), cache_read=D("0.25"))}
        async with engine.begin() as conn:
            assert await store_prices(conn, first, "openrouter", T0) == (2, 0)
        async with engine.begin() as conn:
            assert await store_prices(conn, first, "openrouter", T0 + timedelta(days=1)) == (0, 0)
            assert await store_prices(conn, first, "config", T0 + timedelta(days=1)) == (2, 0)  # per source
        changed = {**first, "b": ModelPrice(D("0.5"), D(1), cache_read=D("0.125"))}
        async with engine.begin() as conn:
            assert await store_prices(conn, changed, "openrouter", T0 + timedelta(days=2)) == (0, 1)
        async with engine.connect() as conn:
            entries = [e for e in await load_entries(conn) if e.source == "openrouter"]
        assert [(e.model, e.effective_from, e.cache_read) for e in entries] == [
            ("a", T0, None),
            ("b", T0, D("0.25")),
            ("b", T0 + timedelta(days=2), D("0.125")),
        ]
    finally:
        await engine.dispose()


async def test_config_prices_recorded_at_start_and_only_when_changed(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    def config(prompt: str) -> Any:
        price = ModelPrice(D(prompt), D(10), cache_read=D("1.25"))
        return make_config(upstream.url, database_url, tmp_path, pricing={"models": {"gpt-4o*": price}})

    for prompt in ("2.5", "2.5", "3"):  # a restart with the same config, then a changed price
        ledger = await start_ledger(config(prompt))
        await ledger.stop()
    engine = create_engine(database_url)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(Price.model, Price.prompt, Price.source).order_by(Price.id))).all()
    await engine.dispose()
    assert [tuple(r) for r in rows] == [("gpt-4o*", D("2.5"), "config"), ("gpt-4o*", D(3), "config")]


@pytest.fixture
def priced_config(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> Any:
    upstream.add("openrouter", json_reply(OPENROUTER_WITH_COST))
    upstream.add("tools", json_reply(OPENAI_TOOL_CALLS))
    prices = {
        "gpt-4o-2024-*": ModelPrice(D("2.5"), D(10), cache_read=D("1.25")),
        "anthropic/*": ModelPrice(D(100), D(100)),  # must not override the upstream's own cost
    }
    return make_config(upstream.url, database_url, tmp_path, pricing={"models": prices})


async def test_the_proxy_prices_calls_the_upstream_did_not(priced_config: Any) -> None:
    ledger = await start_ledger(priced_config)
    try:
        client = openai.AsyncOpenAI(base_url=ledger.url + "/v1", api_key="sk-test", max_retries=0)
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        await client.chat.completions.create(
            model="anthropic/claude-sonnet-4",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Fake-Scenario": "openrouter"},
        )
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Fake-Scenario": "tools"},
        )
        await client.close()
        rows = await ledger.rows()
    finally:
        await ledger.stop()
    costs = [(row["model"], row["cost"], row["cost_source"]) for row in rows]
    usage = OPENAI_BASIC["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    expected = (
        (usage["prompt_tokens"] - cached) * D("2.5") + cached * D("1.25") + usage["completion_tokens"] * 10
    ) / MILLION
    assert costs == [
        (OPENAI_BASIC["model"], expected, "pricing"),
        (OPENROUTER_WITH_COST["model"], D(str(OPENROUTER_WITH_COST["usage"]["cost"])), "upstream"),
        (OPENAI_TOOL_CALLS["model"], None, None),
    ]


async def test_a_running_proxy_picks_up_synced_prices(priced_config: Any) -> None:
    ledger = await start_ledger(priced_config)
    try:
        async with ledger.engine.begin() as conn:
            await store_prices(conn, {"gpt-4o-mini": ModelPrice(D(1), D(2))}, "openrouter")
        await ledger.app[PRICER].refresh()  # what the minute timer does
        client = openai.AsyncOpenAI(base_url=ledger.url + "/v1", api_key="sk-test", max_retries=0)
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Fake-Scenario": "tools"},
        )
        await client.close()
        row = await ledger.row()
    finally:
        await ledger.stop()
    usage = OPENAI_TOOL_CALLS["usage"]
    assert row["cost_source"] == "pricing"
    assert row["cost"] == (usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2) / MILLION


async def test_pricer_reloads_on_its_timer(database_url: str) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    pricer = Pricer(engine, {"cfg": ModelPrice(D(1), D(1))}, interval=0.05)
    await pricer.start()
    try:
        assert pricer.book.price_for("cfg", None, T0) is not None
        assert pricer.book.price_for("new-model", None, T0) is None
        async with engine.begin() as conn:
            await store_prices(conn, {"new-model": ModelPrice(D(4), D(5))}, "openrouter")
        for _ in range(100):
            if pricer.book.price_for("new-model", None, T0) is not None:
                break
            await asyncio.sleep(0.02)
        price = pricer.book.price_for("new-model", None, T0)
        assert price is not None
        assert price.prompt == 4
    finally:
        await pricer.stop()
        await engine.dispose()


async def test_pricer_survives_an_unreachable_database() -> None:
    engine = create_engine("postgresql+asyncpg://postgres@127.0.0.1:9/none")  # the discard port: refused
    pricer = Pricer(engine, {"cfg": ModelPrice(D(1), D(1))}, interval=3600)
    await pricer.start()
    try:
        price = pricer.book.price_for("cfg", None, T0)  # the config's prices still apply
        assert price is not None
        assert price.prompt == 1
    finally:
        await pricer.stop()
        await engine.dispose()


# ---- prices sync / list (CLI against the fake upstream's models endpoint) -----------------------


async def test_prices_sync_and_list(
    upstream: FakeUpstream, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.add("models", json_reply(MODELS_PAYLOAD))
    upstream.default = "models"
    args = ("--database", database_url, "--upstream", upstream.url, "--json")
    code, out, _ = await run_cli(capsys, "prices", "sync", *args)
    assert code == 0
    assert orjson.loads(out) == {"models": 4, "new": 4, "changed": 0, "unchanged": 0}
    assert [(r.method, r.path_qs) for r in upstream.requests] == [("GET", "/api/v1/models")]

    code, out, _ = await run_cli(capsys, "prices", "sync", *args)
    assert orjson.loads(out) == {"models": 4, "new": 0, "changed": 0, "unchanged": 4}

    changed = copy.deepcopy(MODELS_PAYLOAD)
    changed["data"][0]["pricing"]["prompt"] = "0.000002"
    upstream.add("models", json_reply(changed))
    code, out, _ = await run_cli(capsys, "prices", "sync", *args)
    assert orjson.loads(out) == {"models": 4, "new": 0, "changed": 1, "unchanged": 3}

    code, out, _ = await run_cli(capsys, "prices", "list", "--database", database_url, "--json")
    listed = {item["model"]: item for item in map(orjson.loads, out.splitlines())}
    assert set(listed) == {
        "openai/gpt-4o",
        "anthropic/claude-sonnet-4",
        "openai/o3",
        "meta-llama/llama-3.3-70b-instruct:free",
    }
    assert listed["openai/gpt-4o"]["prompt"] == 2
    assert listed["openai/gpt-4o"]["cache_read"] == 1.25
    assert listed["anthropic/claude-sonnet-4"]["cache_write"] == 3.75
    assert all(item["source"] == "openrouter" for item in listed.values())

    code, out, _ = await run_cli(
        capsys, "prices", "list", "--database", database_url, "--history", "-m", "openai/gpt-4o"
    )
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "PROMPT", "COMPLETION"]
    assert [line.split()[:2] for line in lines[1:3]] == [["openai/gpt-4o", "2.5"], ["openai/gpt-4o", "2"]]


async def test_prices_sync_reports_a_failing_upstream(
    upstream: FakeUpstream, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.add("down", json_reply({"error": "nope"}, status=503))
    upstream.default = "down"
    code, out, err = await run_cli(
        capsys, "prices", "sync", "--database", database_url, "--upstream", upstream.url
    )
    assert code == 1
    assert out == ""
    assert "503" in err
    assert "/api/v1/models" in err


# ---- reprice ------------------------------------------------------------------------------------


async def test_reprice(database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    old, new = ModelPrice(D(1), D(2)), ModelPrice(D(3), D(4))
    async with engine.begin() as conn:
        await store_prices(conn, {"gpt-4o": old}, "config", T0)
        await store_prices(conn, {"gpt-4o": new}, "config", T0 + timedelta(days=10))

    def row(n: int, day: int, **fields: Any) -> dict[str, Any]:
        base = {
            "request_id": f"row-{n}",
            "started_at": T0 + timedelta(days=day),
            "method": "POST",
            "path": "/v1/chat/completions",
            "upstream": "u",
            "outcome": "ok",
            "stream": False,
            "model": "gpt-4o",
            "prompt_tokens": 1000,
            "completion_tokens": 100,
            "cost": None,
            "cost_source": None,
        }
        return {**base, **fields}

    rows = [
        row(1, 5, cost=D("0.5"), cost_source="pricing"),  # wrong: old price applies -> 0.0012
        row(2, 12),  # unknown cost, now priced at the new price -> 0.0034
        row(3, 12, cost=D("0.9"), cost_source="upstream"),  # never touched
        row(4, 12, model="mystery"),  # still no price
        row(5, -30, cost=D("0.7"), cost_source="pricing"),  # before --since: untouched
        row(6, 12, prompt_tokens=None, completion_tokens=None),  # no usage: stays unknown
        row(7, 12, cost=D("0.0034"), cost_source="pricing"),  # already right: not counted as changed
    ]
    async with engine.begin() as conn:
        await conn.execute(insert(completions_table), rows)

    async def costs() -> dict[str, tuple[Decimal | None, str | None]]:
        async with engine.connect() as conn:
            found = await conn.execute(
                select(
                    completions_table.c.request_id, completions_table.c.cost, completions_table.c.cost_source
                )
            )
            return {r.request_id: (r.cost, r.cost_source) for r in found}

    before = await costs()
    args = ("reprice", "--database", database_url, "--since", T0.isoformat(), "--json")
    code, out, _ = await run_cli(capsys, *args, "--dry-run")
    report = orjson.loads(out)
    assert code == 0
    assert report["dry_run"] is True
    assert report["rows_changed"] == 2
    assert await costs() == before

    code, out, _ = await run_cli(capsys, *args)
    report = orjson.loads(out)
    assert report == {
        "rows_checked": 5,
        "rows_changed": 2,
        "dry_run": False,
        "total_before": float(D("0.5") + D("0.0034")),
        "total_after": float(D("0.0012") + 2 * D("0.0034")),
        "unknown_before": 3,
        "unknown_after": 2,
    }
    after = await costs()
    assert after == {**before, "row-1": (D("0.0012"), "pricing"), "row-2": (D("0.0034"), "pricing")}

    code, out, _ = await run_cli(capsys, "reprice", "--database", database_url, "--since", T0.isoformat())
    assert code == 0
    assert "changed 0" in out
    code, _, err = await run_cli(capsys, "reprice", "--database", database_url, "--since", "last week")
    assert code == 2
    assert "--since" in err

    # a corrected price in the config, applied to the past with --current (recorded like the proxy does)
    config = tmp_path / "chatledger.toml"
    config.write_text('[pricing.models."gpt-4o"]\nprompt = 5\ncompletion = 6\n')
    fixed = ["reprice", "--config", str(config), "--database", database_url, "--since", T0.isoformat()]
    fixed.append("--current")
    async with engine.connect() as conn:
        prices_before = await load_entries(conn)
    code, out, _ = await run_cli(capsys, *fixed, "--dry-run", "--json")
    assert code == 0
    assert orjson.loads(out)["rows_changed"] == 3
    async with engine.connect() as conn:
        assert await load_entries(conn) == prices_before  # a dry run records nothing
    assert await costs() == after
    code, out, _ = await run_cli(capsys, *fixed, "--json")
    assert code == 0
    assert orjson.loads(out)["rows_changed"] == 3
    corrected = (D(1000) * 5 + D(100) * 6) / MILLION
    assert await costs() == {**after, **{f"row-{n}": (corrected, "pricing") for n in (1, 2, 7)}}
    async with engine.connect() as conn:
        latest = (await load_entries(conn))[-1]
    assert (latest.model, latest.prompt, latest.completion, latest.source) == ("gpt-4o", 5, 6, "config")
    await engine.dispose()
