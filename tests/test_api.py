"""The HTTP query API on a real port: auth (loopback, no token, wrong token, right token, constant-time
compare), every filter, 400s naming the parameter, keyset pagination with inserts between pages, one
completion by request id (a real call through the proxy), stats. Database tests: SQLite and PostgreSQL."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from multidict import MultiDict

from proxy.store import histogram
from proxy.store.filters import Filters
from proxy.store.stats import fetch_stats

from .conftest import Ledger, make_config, start_ledger
from .payloads import OPENAI_BASIC
from .querydata import base_time, expected_ids, filter_cases, insert_rows, make_rows
from .upstream import FakeUpstream

TOKEN = "s3cret-admin-token"
API = "/_ledger/api/completions"


def query(params: dict[str, Any]) -> MultiDict[str]:
    out: MultiDict[str] = MultiDict()
    for name, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            out.add(name, item)
    return out


async def get(
    ledger: Ledger,
    path: str,
    params: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(ledger.url + path, params=params, headers=headers) as response,
    ):
        body = await response.read()
        data = await response.json(content_type=None) if response.content_type == "application/json" else body
        return response.status, data, response.headers


# ---- auth ---------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
async def public_no_token(upstream: FakeUpstream, sqlite_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = await start_ledger(make_config(upstream.url, sqlite_url, tmp_path, server={"host": "0.0.0.0"}))
    yield ledger
    await ledger.stop()


@pytest.fixture
async def with_token(upstream: FakeUpstream, sqlite_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = await start_ledger(make_config(upstream.url, sqlite_url, tmp_path, admin={"token": TOKEN}))
    yield ledger
    await ledger.stop()


PATHS = (API, API + "/some-id", "/_ledger/api/stats", "/_ledger/metrics")


async def test_loopback_without_token_is_open(
    upstream: FakeUpstream, sqlite_url: str, tmp_path: Path
) -> None:
    ledger = await start_ledger(make_config(upstream.url, sqlite_url, tmp_path))
    try:
        assert ledger.config.server.host == "127.0.0.1"
        assert not ledger.config.admin.token
        for path in PATHS:
            status, _, _ = await get(ledger, path)
            assert status == (404 if path.endswith("some-id") else 200), path
    finally:
        await ledger.stop()


async def test_without_a_token_a_public_server_refuses_everyone(
    public_no_token: Ledger, with_token: Ledger
) -> None:
    wrong = await get(with_token, API, token="wrong-token")
    assert wrong[0] == 403
    for path in PATHS:
        for token in (None, "anything", TOKEN):
            status, body, _ = await get(public_no_token, path, token=token)
            assert (status, body) == (wrong[0], wrong[1]), (
                path,
                token,
            )  # indistinguishable from a wrong token


async def test_token_required_and_checked(with_token: Ledger, public_no_token: Ledger) -> None:
    for path in PATHS:
        # no credentials: the same 403 whether or not a token is configured (no probing for one)
        missing = await get(with_token, path)
        assert (missing[0], missing[1]) == (await get(public_no_token, path))[:2]
        assert missing[0] == 403
        assert "WWW-Authenticate" not in missing[2]
        status, _, _ = await get(with_token, path, headers={"Authorization": f"Basic {TOKEN}"})
        assert status == 403
        for wrong in ("wrong", TOKEN + "x", TOKEN[:-1], TOKEN.upper()):
            status, body, _ = await get(with_token, path, token=wrong)
            assert status == 403
            assert body == {
                "error": {
                    "message": "forbidden: a valid admin token is required",
                    "type": "invalid_request_error",
                    "code": "forbidden",
                }
            }
        status, _, _ = await get(with_token, path, token=TOKEN)
        assert status == (404 if path.endswith("some-id") else 200), path


async def test_tokens_are_compared_in_constant_time(
    with_token: Ledger, public_no_token: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert (await get(with_token, API, token="guess"))[0] == 403
    assert (await get(with_token, API, token=TOKEN))[0] == 200
    assert calls == [(b"guess", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]
    calls.clear()
    assert (await get(public_no_token, API, token="guess"))[0] == 403
    assert len(calls) == 1
    assert calls[0][0] == b"guess"


# ---- queries --------------------------------------------------------------------------------------


@pytest.fixture
async def seeded(ledger: Ledger) -> AsyncIterator[tuple[Ledger, list[dict[str, Any]], datetime, datetime]]:
    now = datetime.now(UTC)
    start = base_time(now)
    rows = make_rows(start=start)
    await insert_rows(ledger.engine, rows)
    return ledger, rows, start, now


async def test_every_filter(seeded: Any) -> None:
    ledger, rows, start, now = seeded
    for case in filter_cases(start, now):
        status, body, _ = await get(ledger, API, query({**case.params, "limit": "1000"}))
        assert status == 200, (case.name, body)
        assert [r["id"] for r in body["data"]] == expected_ids(rows, case), case.name
        assert body["next_cursor"] is None


async def test_rows_carry_every_column_and_choices(seeded: Any) -> None:
    ledger, rows, _, _ = seeded
    status, body, _ = await get(ledger, API, {"limit": "3"})
    newest = sorted(rows, key=lambda r: r["id"], reverse=True)[:3]
    assert status == 200
    assert [r["id"] for r in body["data"]] == [r["id"] for r in newest]
    for item, source in zip(body["data"], newest, strict=True):
        assert item["choices"] == source["choices"]
        assert item["tags"] == source["tags"]
        assert item["user"] == source["user"]
        assert datetime.fromisoformat(item["started_at"]) == source["started_at"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"since": "last week"}, "since"),
        ({"until": "2026-02-30"}, "until"),
        ({"status": "abc"}, "status"),
        ({"stream": "maybe"}, "stream"),
        ({"tag": "team"}, "tag"),
        ({"limit": "0"}, "limit"),
        ({"limit": "5000"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "-1"}, "cursor"),
        ({"cursor": "abc"}, "cursor"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_invalid_values_are_400_naming_the_parameter(
    ledger: Ledger, params: dict[str, str], param: str
) -> None:
    status, body, _ = await get(ledger, API, params)
    assert status == 400
    assert body["error"]["param"] == param
    assert body["error"]["code"] == "invalid_parameter"
    status, body, _ = await get(
        ledger, "/_ledger/api/stats", {**params, "limit": "1"} if param == "limit" else params
    )
    if param not in ("limit", "cursor"):
        assert status == 400
        assert body["error"]["param"] == param


async def test_stats_rejects_unknown_dimension(ledger: Ledger) -> None:
    status, body, _ = await get(ledger, "/_ledger/api/stats", {"by": "weekday"})
    assert status == 400
    assert body["error"]["param"] == "by"


async def test_pagination_is_stable_under_inserts(seeded: Any, upstream: FakeUpstream) -> None:
    ledger, rows, start, _ = seeded
    original = sorted((r["id"] for r in rows), reverse=True)
    client = openai.AsyncOpenAI(base_url=ledger.url + "/v1", api_key="sk-page", max_retries=0)
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "10", **({"cursor": cursor} if cursor else {})}
        status, body, _ = await get(ledger, API, params)
        assert status == 200
        seen += [r["id"] for r in body["data"]]
        pages += 1
        cursor = body["next_cursor"]
        # new rows between pages: a direct insert and a real call through the proxy
        late = make_rows(2, start=start)
        for i, row in enumerate(late):
            row["request_id"] = f"late-{pages}-{i}"
        await insert_rows(ledger.engine, late, labels=False)
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        await ledger.recorder.wait_idle()
        if cursor is None:
            break
    await client.close()
    assert seen == original  # no row twice, none skipped, newest first
    assert pages == 6
    status, body, _ = await get(ledger, API, {"limit": "1"})
    assert body["data"][0]["id"] > original[0]  # the new rows are on a fresh first page


async def test_one_completion_by_request_id(ledger: Ledger) -> None:
    client = openai.AsyncOpenAI(base_url=ledger.url + "/v1", api_key="sk-one", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], user="alice"
    )
    await client.close()
    request_id = raw.headers["X-Ledger-Request-Id"]
    await ledger.recorder.wait_idle()
    status, body, _ = await get(ledger, f"{API}/{request_id}")
    assert status == 200
    assert body["request_id"] == request_id
    assert body["user"] == "alice"
    assert body["model"] == OPENAI_BASIC["model"]
    assert body["completion_id"] == OPENAI_BASIC["id"]
    assert body["prompt_tokens"] == OPENAI_BASIC["usage"]["prompt_tokens"]
    assert body["choices"] == [
        {"index": 0, "finish_reason": "stop", "native_finish_reason": None, "role": "assistant"}
    ]
    status, body, _ = await get(ledger, f"{API}/nope")
    assert status == 404
    assert body["error"]["code"] == "not_found"


async def test_stats(seeded: Any) -> None:
    ledger, _, _, _ = seeded
    status, body, _ = await get(ledger, "/_ledger/api/stats", {"by": "model", "user": "user-1"})
    async with ledger.engine.connect() as conn:
        direct = await fetch_stats(conn, "model", Filters(user="user-1"))
    assert status == 200
    assert body["by"] == "model"
    assert [r["key"] for r in body["rows"]] == [r.key for r in direct.rows]
    assert [r["requests"] for r in body["rows"]] == [r.requests for r in direct.rows]
    assert [r["p50_ms"] for r in body["rows"]] == [r.p50_ms for r in direct.rows]
    assert [r["cost"] for r in body["rows"]] == [
        float(r.cost) if r.cost is not None else None for r in direct.rows
    ]
    assert body["totals"]["requests"] == direct.totals.requests > 0


async def test_stats_states_where_its_percentiles_come_from(seeded: Any) -> None:
    ledger, _, _, _ = seeded
    _, rollup, _ = await get(ledger, "/_ledger/api/stats", {"by": "day"})
    _, exact, _ = await get(ledger, "/_ledger/api/stats", {"by": "day", "exact": "true"})
    _, tagged, _ = await get(ledger, "/_ledger/api/stats", {"by": "day", "tag": "team=t1"})
    assert rollup["percentiles"] == histogram.RESOLUTION
    assert exact["percentiles"] == tagged["percentiles"] == "exact"
    assert [r["requests"] for r in rollup["rows"]] == [r["requests"] for r in exact["rows"]]
    assert rollup["totals"]["p50_ms"] is not None
    assert exact["totals"]["p50_ms"] is None
    status, body, _ = await get(ledger, "/_ledger/api/stats", {"exact": "perhaps"})
    assert status == 400
    assert body["error"]["param"] == "exact"
