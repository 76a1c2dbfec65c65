"""The dashboard over real sockets: the overview's totals and chart against the rows (computed here in plain
Python), every filter and the keyset pager of the list, the detail page against its row, escaping of
hostile logged values, the safety headers, the login and session cookie, and the Host rule that keeps a
DNS-rebinding page out when no token is set. Database behaviour runs on SQLite and PostgreSQL."""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp
import pytest

from proxy.config import load
from proxy.store import histogram
from proxy.store.filters import Filters
from proxy.store.series import OTHER, fetch_series
from proxy.web.auth import SESSION_COOKIE, SESSION_SECONDS, AdminAuth, host_is_loopback
from proxy.web.dashboard import views
from proxy.web.dashboard.login_throttle import MAX_FAILURES, WINDOW_SECONDS, LoginThrottle
from proxy.web.dashboard.render import money

from .conftest import Ledger, make_config, start_ledger
from .helpers import raw_request
from .querydata import (
    KEY_LABELS,
    base_time,
    expected_ids,
    filter_cases,
    insert_rows,
    make_rows,
    within_histogram_resolution,
)
from .upstream import FakeUpstream

TOKEN = "dash-admin-token-1234"
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
HOSTILE = {
    "user": '<script>alert("user")</script>',
    "model": "<img src=x onerror=alert(1)>",
    "tags": {"<b>team</b>": "<script>alert('tag')</script>"},
    "error": "</pre><script>alert('error')</script>",
}


async def fetch(
    ledger: Ledger,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
    method: str = "GET",
    data: Any = None,
) -> tuple[int, str, Any]:
    async with (
        aiohttp.ClientSession(cookies=cookies) as session,
        session.request(method, ledger.url + path, headers=headers, data=data, allow_redirects=False) as response,
    ):
        return response.status, await response.text(), response.headers


def by_id(page: str, ident: str) -> str:
    found = re.search(rf'id="{re.escape(ident)}">([^<]*)<', page)
    assert found, ident
    return html.unescape(found.group(1))


def detail_ids(page: str) -> list[str]:
    """The request ids of a list page, in order (from the links to each call)."""
    return [html.unescape(m) for m in re.findall(r'href="/_ledger/requests/([^"?]+)"', page)]


def next_link(page: str) -> str | None:
    found = re.search(r'<a href="([^"]+)" rel="next">', page)
    return html.unescape(found.group(1)) if found else None


@pytest.fixture
async def seeded(ledger: Ledger) -> AsyncIterator[tuple[Ledger, list[dict[str, Any]], datetime, datetime]]:
    now = datetime.now(UTC)
    start = base_time(now)
    rows = make_rows(start=start)
    await insert_rows(ledger.engine, rows)
    return ledger, rows, start, now


# ---- overview -----------------------------------------------------------------------------------


async def test_overview_totals_match_the_rows(seeded: Any) -> None:
    ledger, rows, _, _ = seeded
    status, page, headers = await fetch(ledger, "/_ledger/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    costs = [r["cost"] for r in rows if r["cost"] is not None]
    durations = [r["duration_ms"] for r in rows if r["duration_ms"] is not None]
    assert by_id(page, "total-requests") == f"{len(rows):,}"
    assert by_id(page, "total-errors") == str(sum(r["outcome"] != "ok" for r in rows))
    assert by_id(page, "total-cost") == money(sum(costs, Decimal(0)))
    assert by_id(page, "total-unknown-cost") == str(len(rows) - len(costs))
    for column in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
        expected = sum(r[column] or 0 for r in rows)
        assert by_id(page, "total-" + column.replace("_", "-")) == f"{expected:,}", column
    for name, p in (("p50", 0.5), ("p95", 0.95)):  # the last 7 days: from the rollups' histograms
        shown = float(by_id(page, name).removesuffix(" ms").replace(",", ""))
        assert within_histogram_resolution(shown, durations, p), (name, shown)
    assert 'title="' + html.escape(histogram.RESOLUTION) + '">from histograms</span>' in page
    # the chart: one bar per (day, model) with calls, stacked; the legend links to the filtered list
    bars = re.findall(r'<rect class="s(\d)" x="[\d.]+" y="[\d.]+" width="[\d.]+" height="([\d.]+)"><title>', page)
    days_models = {(r["started_at"].date(), r["model"] or r["requested_model"]) for r in rows if r["cost"]}
    assert len(bars) == len(days_models)
    # the 7-day period is today and the six UTC days before: its links carry that start
    start = quote(views.period_start("7d", datetime.now(UTC)).isoformat(), safe="")
    assert start.startswith((datetime.now(UTC) - timedelta(days=6)).date().isoformat())
    assert f'href="/_ledger/requests?since={start}&amp;model=gpt-4o-2024-08-06"' in page
    # every top list is there, keys by their labels, each cell a link to the list filtered by it
    for label in KEY_LABELS.values():
        assert f">{label}</a>" in page
    assert f'href="/_ledger/requests?since={start}&amp;user=user-1"' in page
    assert f'href="/_ledger/requests?since={start}&amp;tag=team%3Dt1"' in page


async def test_overview_period_narrows_the_totals(seeded: Any) -> None:
    ledger, rows, _, _ = seeded
    status, page, _ = await fetch(ledger, "/_ledger/?since=24h")
    assert status == 200
    start = views.period_start("24h", datetime.now(UTC))  # this hour and the 23 before it
    assert start == datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    recent = [r for r in rows if r["started_at"] >= start]
    assert 0 < len(recent) < len(rows)
    assert by_id(page, "total-requests") == str(len(recent))
    assert "per hour" in page  # a period of a day is drawn by the hour
    status, page, _ = await fetch(ledger, "/_ledger/?since=30d")
    assert by_id(page, "total-requests") == str(len(rows))
    assert "per day" in page


async def test_series_matches_the_rows(seeded: Any) -> None:
    ledger, rows, _, _ = seeded
    async with ledger.engine.connect() as conn:
        points = await fetch_series(conn, Filters(), "hour", top=3)
    expected: dict[tuple[datetime, str], list[dict[str, Any]]] = {}
    spent: dict[str, Decimal] = {}
    for r in rows:
        name = r["model"] or r["requested_model"] or "(no model)"
        spent[name] = spent.get(name, Decimal(0)) + (r["cost"] or 0)
    top = sorted(spent, key=lambda name: -spent[name])[:3]
    for r in rows:
        name = r["model"] or r["requested_model"] or "(no model)"
        hour = r["started_at"].replace(minute=0, second=0, microsecond=0)
        expected.setdefault((hour, name if name in top else OTHER), []).append(r)
    got = {(p.bucket, p.model): (p.requests, p.cost) for p in points}
    want = {}
    for key, members in expected.items():
        costs = [m["cost"] for m in members if m["cost"] is not None]
        want[key] = (len(members), sum(costs, Decimal(0)) if costs else None)
    assert got == want
    assert [p.bucket for p in points] == sorted(p.bucket for p in points)
    assert all(p.bucket.tzinfo is not None for p in points)


# ---- the list -----------------------------------------------------------------------------------


async def test_every_filter_narrows_the_list(seeded: Any) -> None:
    ledger, rows, start, now = seeded
    request_ids = {r["id"]: r["request_id"] for r in rows}
    for case in filter_cases(start, now):
        params = [
            (k, v) for k, values in case.params.items() for v in (values if isinstance(values, list) else [values])
        ]
        async with (
            aiohttp.ClientSession() as session,
            session.get(ledger.url + "/_ledger/requests", params=[*params, ("limit", "100")]) as response,
        ):
            assert response.status == 200, case.name
            page = await response.text()
        assert detail_ids(page) == [request_ids[i] for i in expected_ids(rows, case)], case.name


async def test_pager_reaches_the_oldest_row(seeded: Any) -> None:
    ledger, rows, _, _ = seeded
    path: str | None = "/_ledger/requests?model=gpt-4o*&limit=4"
    seen: list[str] = []
    pages = 0
    while path is not None:
        status, page, _ = await fetch(ledger, path)
        assert status == 200
        seen += detail_ids(page)
        path = next_link(page)
        pages += 1
        if path is not None:
            assert dict(parse_qsl(urlsplit(path).query))["model"] == "gpt-4o*"  # the filter rides along
    wanted = [
        r
        for r in sorted(rows, key=lambda r: -r["id"])
        if any((name or "").startswith("gpt-4o") for name in (r["model"], r["requested_model"]))
    ]
    assert seen == [r["request_id"] for r in wanted]
    assert pages == -(-len(wanted) // 4)  # one row of look-ahead: no empty last page


async def test_bad_filters_answer_400_with_the_form(seeded: Any) -> None:
    ledger, _, _, _ = seeded
    for path, param in (
        ("/_ledger/requests?status=abc", "status"),
        ("/_ledger/requests?cursor=-1", "cursor"),
        ("/_ledger/requests?limit=1000", "limit"),
        ("/_ledger/?since=yesterday-ish", "since"),
    ):
        status, page, _ = await fetch(ledger, path)
        assert status == 400, path
        assert f"<strong>{param}</strong>" in page
        assert '<form method="get"' in page


# ---- detail -------------------------------------------------------------------------------------


async def test_detail_page_shows_the_row(seeded: Any) -> None:
    ledger, rows, _, _ = seeded
    row = next(r for r in rows if r["error"] and r["tags"] and r["choices"] and r["api_key_hash"] in KEY_LABELS)
    status, page, _ = await fetch(ledger, f"/_ledger/requests/{row['request_id']}")
    assert status == 200
    cells = {name: html.unescape(value) for name, value in re.findall(r'data-column="(\w+)">([^<]*)<', page)}
    assert cells["request_id"] == row["request_id"]
    assert cells["completion_id"] == row["completion_id"]
    assert cells["model"] == row["model"]
    assert cells["prompt_tokens"] == str(row["prompt_tokens"])
    assert cells["error"] == row["error"]
    assert datetime.fromisoformat(cells["started_at"]) == row["started_at"]
    assert Decimal(cells["cost"]) == row["cost"]
    assert {name for name, value in row.items() if value is not None and name != "choices"} == set(cells)
    assert by_id(page, "detail-error") == row["error"]
    for choice in row["choices"]:
        assert f"<td>{choice['finish_reason']}</td>" in page
    for name, value in row["tags"].items():
        assert f">{name}={value}</a>" in page
    assert KEY_LABELS[row["api_key_hash"]] in page
    usage = html.unescape(re.search(r'<pre id="usage">(.*?)</pre>', page, re.DOTALL).group(1))  # type: ignore[union-attr]
    assert json.loads(usage) == row["usage"]
    assert "\n  " in usage  # pretty-printed
    status, page, _ = await fetch(ledger, "/_ledger/requests/no-such-call")
    assert status == 404


async def test_a_real_call_through_the_proxy_shows_up(ledger: Ledger) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=ledger.url + "/v1", api_key="sk-dash-test", max_retries=0)
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], user="ann")
    await client.close()
    row = await ledger.row()
    status, page, _ = await fetch(ledger, "/_ledger/requests?user=ann")
    assert detail_ids(page) == [row["request_id"]]
    status, page, _ = await fetch(ledger, f"/_ledger/requests/{row['request_id']}")
    assert status == 200
    assert "sk-dash-test" not in page
    assert row["api_key_hash"] in page


# ---- hostile values and headers -----------------------------------------------------------------


async def test_hostile_logged_values_stay_text(ledger: Ledger) -> None:
    rows = make_rows(3)
    rows[1].update(HOSTILE)
    rows[1]["requested_model"] = HOSTILE["model"]
    await insert_rows(ledger.engine, rows)
    pages = [
        "/_ledger/",
        "/_ledger/requests",
        "/_ledger/requests?user=" + aiohttp.helpers.quote(HOSTILE["user"], safe=""),
        f"/_ledger/requests/{rows[1]['request_id']}",
    ]
    for path in pages:
        status, page, headers = await fetch(ledger, path)
        assert status == 200, path
        assert "<script" not in page.lower(), path
        assert "<img" not in page.lower(), path
        assert "<b>" not in page, path
        assert " style=" not in page, path
        assert "javascript:" not in page.lower(), path
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    status, page, _ = await fetch(ledger, f"/_ledger/requests/{rows[1]['request_id']}")
    assert by_id(page, "detail-error") == HOSTILE["error"]  # shown as text, whole
    cells = {name: html.unescape(value) for name, value in re.findall(r'data-column="(\w+)">([^<]*)<', page)}
    assert cells["user"] == HOSTILE["user"]
    assert cells["tags"] == json.dumps(HOSTILE["tags"], separators=(",", ":"))


async def test_safety_headers_on_every_page(seeded: Any) -> None:
    ledger, rows, _, _ = seeded
    for path in ("/_ledger/", "/_ledger/requests", f"/_ledger/requests/{rows[0]['request_id']}",
                 "/_ledger/login", "/_ledger/requests/missing", "/_ledger/requests?status=x"):  # fmt: skip
        _, _, headers = await fetch(ledger, path)
        csp = headers["Content-Security-Policy"]
        assert "script-src" not in csp
        assert "'unsafe-inline'" not in csp
        for directive in ("default-src 'none'", "frame-ancestors 'none'", "form-action 'self'", "base-uri 'none'"):
            assert directive in csp, path
        for name, value in SECURITY_HEADERS.items():
            assert headers[name] == value, (path, name)
        assert headers["Cache-Control"] == "no-store"
    status, body, headers = await fetch(ledger, "/_ledger/static/dashboard.css")
    assert status == 200
    assert headers["Content-Type"].startswith("text/css")
    assert "prefers-color-scheme: dark" in body


# ---- access -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("LOCALHOST:8080", True),
        ("127.0.0.1", True),
        ("127.0.0.1:8080", True),
        ("127.8.9.10:1", True),
        ("[::1]", True),
        ("[::1]:8080", True),
        (None, False),
        ("", False),
        ("evil.example", False),
        ("evil.example:8080", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
        ("127.1", False),
        ("::1", False),
        ("[::1]x", False),
        ("[::1]:80:80", False),
        ("localhost:80a", False),
        ("10.0.0.1", False),
        ("[::ffff:10.0.0.1]", False),
    ],
)
def test_loopback_host_names(host: str | None, allowed: bool) -> None:
    assert host_is_loopback(host) is allowed


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
async def open_ledger(upstream: FakeUpstream, sqlite_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = await start_ledger(make_config(upstream.url, sqlite_url, tmp_path))
    yield ledger
    await ledger.stop()


@pytest.fixture
async def token_ledger(upstream: FakeUpstream, sqlite_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = await start_ledger(make_config(upstream.url, sqlite_url, tmp_path, admin={"token": TOKEN}))
    yield ledger
    await ledger.stop()


GUARDED = ("/_ledger/", "/_ledger/requests", "/_ledger/requests/abcdef12", "/_ledger/api/completions",
           "/_ledger/api/stats", "/_ledger/metrics")  # fmt: skip


async def test_dns_rebinding_without_a_token_is_refused(open_ledger: Ledger) -> None:
    """A page on evil.example whose name now resolves to 127.0.0.1 reaches the port, but its requests
    carry Host: evil.example."""
    for path in GUARDED:
        for host in ("evil.example", f"evil.example:{open_ledger.port}", f"127.0.0.1.evil.example:{open_ledger.port}"):
            status, _, _ = await fetch(open_ledger, path, headers={"Host": host})
            assert status == 403, (path, host)
        for host in (f"localhost:{open_ledger.port}", f"127.0.0.1:{open_ledger.port}", f"[::1]:{open_ledger.port}"):
            status, _, _ = await fetch(open_ledger, path, headers={"Host": host})
            assert status != 403, (path, host)
    status, _, _ = await fetch(open_ledger, "/_ledger/health", headers={"Host": "evil.example"})
    assert status == 200
    # no Host at all (HTTP/1.0) is refused too
    reply = await raw_request(open_ledger.port, b"GET /_ledger/api/completions HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 403") or reply.startswith(b"HTTP/1.1 403"), reply[:40]


async def test_public_listener_without_a_token_refuses_the_pages(
    upstream: FakeUpstream, sqlite_url: str, tmp_path: Path
) -> None:
    ledger = await start_ledger(make_config(upstream.url, sqlite_url, tmp_path, server={"host": "0.0.0.0"}))
    try:
        status, page, _ = await fetch(ledger, "/_ledger/")
        assert status == 403
        assert "Forbidden" in page
        status, _, _ = await fetch(ledger, "/_ledger/login", method="POST", data={"token": "x"})
        assert status == 403
    finally:
        await ledger.stop()


async def test_login_sets_a_signed_session_cookie(token_ledger: Ledger) -> None:
    status, _, headers = await fetch(token_ledger, "/_ledger/requests?user=a")
    assert status == 303
    assert headers["Location"] == "/_ledger/login?next=%2F_ledger%2Frequests%3Fuser%3Da"
    status, page, _ = await fetch(token_ledger, "/_ledger/login")
    assert status == 200
    assert 'type="password" name="token"' in page
    # a wrong token: the form again, no cookie
    status, page, headers = await fetch(token_ledger, "/_ledger/login", method="POST", data={"token": "wrong"})
    assert status == 403
    assert "Set-Cookie" not in headers
    assert "not the admin token" in page
    # the right one: a redirect to where the reader was going, and the cookie
    form = {"token": TOKEN, "next": "/_ledger/requests?user=a"}
    status, _, headers = await fetch(token_ledger, "/_ledger/login", method="POST", data=form)
    assert status == 303
    assert headers["Location"] == "/_ledger/requests?user=a"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(SESSION_COOKIE + "=")
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/_ledger/", f"Max-Age={SESSION_SECONDS}"):
        assert flag in cookie, flag
    assert "Secure" not in cookie  # plain HTTP here
    assert TOKEN not in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    for path in GUARDED:
        status, _, _ = await fetch(token_ledger, path, cookies={SESSION_COOKIE: value})
        assert status in (200, 404), path
    # a forged or altered cookie does not pass
    expires, signature = value.split(".")
    for forged in (f"{int(expires) + 3600}.{signature}", f"{expires}.{'0' * 64}", expires, "", "1.2.3"):
        status, _, _ = await fetch(token_ledger, "/_ledger/api/completions", cookies={SESSION_COOKIE: forged})
        assert status == 403, forged
    # the bearer token works for the pages too; signing out clears the cookie
    status, _, _ = await fetch(token_ledger, "/_ledger/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    status, _, headers = await fetch(token_ledger, "/_ledger/logout", method="POST", cookies={SESSION_COOKIE: value})
    assert status == 303
    assert f"{SESSION_COOKIE}=" in headers["Set-Cookie"]
    assert "Max-Age=0" in headers["Set-Cookie"]


async def test_login_never_redirects_off_the_dashboard(token_ledger: Ledger) -> None:
    for target in ("https://evil.example/", "//evil.example/", "/_ledger//evil.example", "/\\evil.example",
                   "/_ledger/\r\nSet-Cookie: x=1", "javascript:alert(1)"):  # fmt: skip
        status, _, headers = await fetch(
            token_ledger, "/_ledger/login", method="POST", data={"token": TOKEN, "next": target}
        )
        assert status == 303
        assert headers["Location"] == "/_ledger/", target


async def test_wrong_tokens_are_throttled_per_address(token_ledger: Ledger) -> None:
    for _ in range(MAX_FAILURES):
        status, _, _ = await fetch(token_ledger, "/_ledger/login", method="POST", data={"token": "guess"})
        assert status == 403
    # past the limit even the right token is refused until the window ends, and no cookie is set
    status, page, headers = await fetch(token_ledger, "/_ledger/login", method="POST", data={"token": TOKEN})
    assert status == 429
    assert 0 < int(headers["Retry-After"]) <= WINDOW_SECONDS + 1
    assert "Set-Cookie" not in headers
    assert "Too many wrong tokens" in page
    # the bearer token on the pages is not the login form: it still works
    status, _, _ = await fetch(token_ledger, "/_ledger/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200


def test_the_throttle_forgets_after_its_window_and_bounds_its_table() -> None:
    now = [0.0]
    throttle = LoginThrottle(max_failures=2, window=60.0, max_addresses=3, clock=lambda: now[0])
    throttle.failed("a")
    assert throttle.retry_after("a") == 0
    throttle.failed("a")
    assert throttle.retry_after("a") == 61
    now[0] = 30.0
    assert throttle.retry_after("a") == 31
    now[0] = 60.0
    assert throttle.retry_after("a") == 0
    for address in ("b", "c", "d", "e"):
        throttle.failed(address)
        throttle.failed(address)
    assert throttle.retry_after("b") == 0  # evicted: the table holds 3 addresses
    assert all(throttle.retry_after(address) > 0 for address in ("c", "d", "e"))
    throttle.succeeded("e")
    assert throttle.retry_after("e") == 0


async def test_login_form_body_is_bounded(token_ledger: Ledger) -> None:
    status, _, _ = await fetch(token_ledger, "/_ledger/login", method="POST", data={"token": "x" * 10_000})
    assert status == 413


def test_sessions_expire_and_end_with_the_token() -> None:
    now = [1_000_000.0]
    config = load(None, {("admin", "token"): TOKEN}, environ={})
    auth = AdminAuth(config, clock=lambda: now[0])
    value = auth.new_session()
    assert auth.session_valid(value)
    now[0] += SESSION_SECONDS - 1
    assert auth.session_valid(value)
    now[0] += 2
    assert not auth.session_valid(value)
    other = AdminAuth(load(None, {("admin", "token"): TOKEN + "-rotated"}, environ={}), clock=lambda: now[0])
    assert not other.session_valid(auth.new_session())
    assert not AdminAuth(load(None, {}, environ={})).session_valid(value)
