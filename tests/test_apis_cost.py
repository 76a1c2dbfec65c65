"""Cost across APIs, through real calls: logged with no prices (cost unknown, never 0), then priced by
`chatledger reprice` once prices exist, each API by its own token convention; `stats --by api` and the
API's `api=` filter group them. SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.config import ModelPrice
from proxy.store.engine import create_engine
from proxy.store.pricing.table import store_prices

from .api_payloads import (
    EMBEDDINGS_USAGE,
    MESSAGE_BASIC,
    MESSAGE_USAGE,
    RESPONSES_BASIC,
    RESPONSES_USAGE,
    TEXT_COMPLETION,
    embeddings_body,
)
from .conftest import Ledger, make_config, start_ledger
from .payloads import OPENAI_BASIC
from .querydata import run_cli
from .sdk_helpers import Tee, anthropic_client, openai_client, usd
from .upstream import FakeUpstream, json_reply

RATES = {  # USD per million: prompt, completion, cache_read, cache_write
    "gpt-4o-2024-08-06": (2.5, 10, 1.25, None),
    "o4-mini-2025-04-16": (1.1, 4.4, 0.275, None),
    "text-embedding-3-small": (0.02, 0, None, None),
    "gpt-3.5-turbo-instruct:20230824-v2": (1.5, 2, None, None),
    "claude-sonnet-4-5-20250929": (3, 15, 0.3, 3.75),
}


@pytest.fixture
async def ledger(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    proxy = await start_ledger(make_config(upstream.url, database_url, tmp_path))
    yield proxy
    await proxy.stop()


def expected() -> dict[str, Decimal]:
    """Each API's cost worked out by hand from its own usage object."""
    chat = OPENAI_BASIC["usage"]
    prompt, completion, cache_read, _ = RATES[OPENAI_BASIC["model"]]
    chat_cached = chat["prompt_tokens_details"]["cached_tokens"]
    o4 = RATES[RESPONSES_BASIC["model"]]
    r_cached = RESPONSES_USAGE["input_tokens_details"]["cached_tokens"]
    claude = RATES[MESSAGE_BASIC["model"]]
    text = TEXT_COMPLETION["usage"]
    return {
        "chat": usd(
            (chat["prompt_tokens"] - chat_cached, prompt),
            (chat_cached, cache_read),
            (chat["completion_tokens"], completion),
        ),
        "responses": usd(
            (RESPONSES_USAGE["input_tokens"] - r_cached, o4[0]),
            (r_cached, o4[2]),  # type: ignore[arg-type]
            (RESPONSES_USAGE["output_tokens"], o4[1]),
        ),
        "embeddings": usd((EMBEDDINGS_USAGE["prompt_tokens"], RATES["text-embedding-3-small"][0])),
        "completions": usd(
            (text["prompt_tokens"], RATES[TEXT_COMPLETION["model"]][0]),
            (text["completion_tokens"], RATES[TEXT_COMPLETION["model"]][1]),
        ),
        "messages": usd(
            (MESSAGE_USAGE["input_tokens"], claude[0]),
            (MESSAGE_USAGE["cache_read_input_tokens"], claude[2]),  # type: ignore[arg-type]
            (MESSAGE_USAGE["cache_creation_input_tokens"], claude[3]),  # type: ignore[arg-type]
            (MESSAGE_USAGE["output_tokens"], claude[1]),
        ),
    }


async def call_every_api(ledger: Ledger, upstream: FakeUpstream) -> None:
    upstream.add("chat", json_reply(OPENAI_BASIC))
    upstream.add("responses", json_reply(RESPONSES_BASIC))
    upstream.add("embeddings", json_reply(embeddings_body("float")))
    upstream.add("completions", json_reply(TEXT_COMPLETION))
    upstream.add("messages", json_reply(MESSAGE_BASIC))
    base = ledger.url + "/v1"
    async with openai_client(base, Tee(), "chat") as client:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    async with openai_client(base, Tee(), "responses") as client:
        await client.responses.create(model="o4-mini", input="hi")
    async with openai_client(base, Tee(), "embeddings") as client:
        await client.embeddings.create(model="text-embedding-3-small", input="hi", encoding_format="float")
    async with openai_client(base, Tee(), "completions") as client:
        await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    async with anthropic_client(ledger.url, Tee(), "messages") as client:
        await client.messages.create(
            model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )


async def stats_by_api(ledger: Ledger, **params: str) -> dict[str, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(ledger.url + "/_ledger/api/stats", params={"by": "api", **params}) as response,
    ):
        assert response.status == 200
        return {row["key"]: row for row in (await response.json())["rows"]}


async def test_reprice_prices_every_api_by_its_convention(
    ledger: Ledger, upstream: FakeUpstream, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await call_every_api(ledger, upstream)
    rows = await ledger.rows(count=5)
    assert [(r["api"], r["cost"]) for r in rows] == [(api, None) for api in expected()]
    by_api = await stats_by_api(ledger)
    assert {api: (row["requests"], row["unknown_cost"]) for api, row in by_api.items()} == {
        api: (1, 1) for api in expected()
    }
    anthropic_input = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    assert by_api["messages"]["prompt_tokens"] == sum(MESSAGE_USAGE[name] for name in anthropic_input)

    engine = create_engine(database_url)
    try:
        prices = {
            model: ModelPrice(
                *(Decimal(str(rate)) for rate in rates[:2]),
                *(None if rate is None else Decimal(str(rate)) for rate in rates[2:]),
            )
            for model, rates in RATES.items()
        }
        async with engine.begin() as conn:
            await store_prices(conn, prices, "config")
    finally:
        await engine.dispose()
    code, out, err = await run_cli(capsys, "reprice", "--database", database_url, "--since", "2000-01-01", "--json")
    assert code == 0, err
    assert orjson.loads(out)["rows_changed"] == 5
    rows = await ledger.rows()
    assert {r["api"]: (r["cost"], r["cost_source"]) for r in rows} == {
        api: (cost, "pricing") for api, cost in expected().items()
    }
    by_api = await stats_by_api(ledger)
    assert {api: Decimal(str(row["cost"])) for api, row in by_api.items()} == expected()
    only = await stats_by_api(ledger, api="embeddings")
    assert list(only) == ["embeddings"]
