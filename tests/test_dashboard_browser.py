"""The dashboard in a real browser: headless Chromium (the system's /usr/bin/chromium, driven by Playwright)
against a running `chatledger serve`, with traffic sent through it by the openai SDK to a fake upstream.

Checked: the login (a wrong token stays out, the right one gets in), the overview's totals against the
database, the chart is drawn, a filter narrows the list, the pager reaches the oldest row, the detail page
matches its row, and a `<script>` in a logged `user` stays text (no dialog, no script element). Screenshots
of every page (and the overview at phone width in the dark theme) are saved under the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import openai
import orjson
import pytest
from aiohttp import web
from sqlalchemy import func, select

from proxy.store.engine import create_engine
from proxy.store.models import completions_table
from proxy.web.dashboard.render import money

from .payloads import OPENAI_BASIC
from .test_cli import Served, chatledger_command, clean_env, free_port, wait_until_healthy
from .upstream import FakeUpstream

CHROMIUM = os.environ.get("CHATLEDGER_TEST_CHROMIUM", "/usr/bin/chromium")
TOKEN = "browser-admin-token-42"
HOSTILE_USER = '<script>alert("logged user")</script><img src=x onerror=alert(2)>'
MODELS = ("gpt-4o", "gpt-4o-mini", "anthropic/claude-sonnet-4")
CALLS = 14

playwright_api = pytest.importorskip("playwright.async_api", reason="the browser tests need the playwright package")
pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"the browser tests need Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run does)",
)


async def echo_model(request: web.Request, body: bytes) -> web.Response:
    """OPENAI_BASIC, answering with the model asked for and token counts that vary with the prompt."""
    asked = orjson.loads(body)
    words = len(asked["messages"][0]["content"].split())
    reply = {
        **OPENAI_BASIC,
        "model": asked["model"],
        "usage": {"prompt_tokens": 100 + words, "completion_tokens": 10 + words, "total_tokens": 110 + 2 * words},
    }
    return web.Response(body=orjson.dumps(reply), content_type="application/json")


@pytest.fixture
async def served(tmp_path: Path, database_url: str) -> AsyncIterator[tuple[Served, str]]:
    upstream = FakeUpstream()
    upstream.add("basic", echo_model)
    await upstream.start()
    port = free_port()
    config = tmp_path / "chatledger.toml"
    prices = "".join(
        f'[pricing.models."{m}"]\nprompt = {2.5 + i}\ncompletion = {10 + i}\n' for i, m in enumerate(MODELS)
    )
    config.write_text(
        f'[server]\nport = {port}\n[upstream]\nurl = "{upstream.url}"\n[database]\nurl = "{database_url}"\n'
        f'spool_dir = "{tmp_path / "spool"}"\n[admin]\ntoken = "{TOKEN}"\n{prices}'
    )
    process = await asyncio.create_subprocess_exec(
        *chatledger_command(), "serve", "--config", str(config),
        cwd=tmp_path, env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    server = Served(process, port)
    try:
        await wait_until_healthy(server)
        yield server, database_url
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.communicate(), 30)
        await upstream.stop()


async def send_traffic(url: str) -> None:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-browser-test", max_retries=0) as client:
        for i in range(CALLS):
            user = HOSTILE_USER if i == 5 else ("alice", "bob")[i % 2]
            await client.chat.completions.create(
                model=MODELS[i % len(MODELS)],
                messages=[{"role": "user", "content": " ".join(["word"] * (i + 1))}],
                user=user,
            )


async def database_rows(database_url: str, count: int) -> list[dict[str, Any]]:
    """Every row, newest first, once the writer has logged `count` of them."""
    engine = create_engine(database_url)
    try:
        for _ in range(200):
            async with engine.connect() as conn:
                if (await conn.execute(select(func.count()).select_from(completions_table))).scalar_one() >= count:
                    query = select(completions_table).order_by(completions_table.c.id.desc())
                    return [dict(row._mapping) for row in await conn.execute(query)]
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
    raise AssertionError(f"the writer did not log {count} rows")


async def test_dashboard_in_a_browser(served: tuple[Served, str], tmp_path: Path) -> None:
    server, database_url = served
    await send_traffic(server.url)
    rows = await database_rows(database_url, CALLS)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    dialogs: list[str] = []

    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = await browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light")
        page = await context.new_page()
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))

        async def no_script() -> None:
            assert await page.locator("script").count() == 0
            assert dialogs == []

        # login: a wrong token is refused, the right one lands on the overview
        await page.goto(server.url + "/_ledger/")
        assert page.url.startswith(server.url + "/_ledger/login")
        await page.screenshot(path=shots / "login.png")
        await page.fill("input[name=token]", "not-the-token")
        await page.click("button[type=submit]")
        assert "not the admin token" in await page.inner_text("main")
        assert await context.cookies() == []
        await page.fill("input[name=token]", TOKEN)
        await page.click("button[type=submit]")
        assert page.url == server.url + "/_ledger/"
        cookie = (await context.cookies())[0]
        assert cookie["httpOnly"]
        assert cookie["sameSite"] == "Strict"

        # overview: the totals of the database, and a drawn chart
        assert await page.inner_text("#total-requests") == str(len(rows))
        assert await page.inner_text("#total-cost") == money(sum((r["cost"] for r in rows), Decimal(0)))
        assert await page.inner_text("#total-prompt-tokens") == f"{sum(r['prompt_tokens'] for r in rows):,}"
        bars = page.locator("svg.spend rect")
        assert await bars.count() == len(MODELS)  # one hour (or day), one bar per model
        box = await page.locator("svg.spend").bounding_box()
        assert box is not None
        assert box["width"] > 300
        assert box["height"] > 100
        await no_script()
        await page.screenshot(path=shots / "overview.png", full_page=True)

        # the list, five at a time, to the oldest row
        await page.goto(server.url + "/_ledger/requests?limit=5")
        await no_script()
        await page.screenshot(path=shots / "list.png", full_page=True)
        seen: list[str] = []
        while True:
            seen += await page.locator("table.calls tbody tr td:last-child").all_inner_texts()
            older = page.locator("a[rel=next]")
            if await older.count() == 0:
                break
            await older.click()
        assert seen == [r["request_id"][-8:] for r in rows]
        # the hostile user is text on the page
        cell = page.locator("table.calls td.name a", has_text="logged user").first
        await page.goto(server.url + "/_ledger/requests")
        assert await cell.inner_text() == HOSTILE_USER
        await no_script()

        # a filter set with the form narrows the list
        await page.click("details.filters summary")
        await page.fill("input[name=model]", "gpt-4o-mini")
        await page.click("details.filters button[type=submit]")
        models = await page.locator("table.calls tbody tr td:nth-child(2)").all_inner_texts()
        assert models == [r["model"] for r in rows if r["model"] == "gpt-4o-mini"]
        assert 0 < len(models) < len(rows)
        await page.screenshot(path=shots / "list-filtered.png", full_page=True)

        # the detail page of the hostile user's call matches its row
        target = next(r for r in rows if r["user"] == HOSTILE_USER)
        await page.goto(server.url + "/_ledger/requests?user=" + quote(HOSTILE_USER, safe=""))
        await page.click(f"text={target['request_id'][-8:]}")
        cells = {
            name: await page.inner_text(f'td[data-column="{name}"]')
            for name in ("request_id", "model", "user", "prompt_tokens", "completion_tokens", "cost", "cost_source")
        }
        assert cells == {
            "request_id": target["request_id"],
            "model": target["model"],
            "user": HOSTILE_USER,
            "prompt_tokens": str(target["prompt_tokens"]),
            "completion_tokens": str(target["completion_tokens"]),
            "cost": f"{target['cost']:f}",
            "cost_source": target["cost_source"],
        }
        assert "stop" in await page.inner_text("main")
        await no_script()
        await page.screenshot(path=shots / "detail.png", full_page=True)

        # a phone in dark mode, signed in with the same cookie
        phone = await browser.new_context(
            viewport={"width": 390, "height": 844}, color_scheme="dark", device_scale_factor=2, is_mobile=True
        )
        await phone.add_cookies([cookie])
        mobile = await phone.new_page()
        await mobile.goto(server.url + "/_ledger/")
        background = await mobile.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(20, 22, 26)"
        await mobile.screenshot(path=shots / "overview-phone-dark.png", full_page=True)
        wide = await mobile.evaluate(
            "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 391)"
            ".map(e => e.tagName + '.' + e.className.baseVal ?? e.className).slice(0, 5)"
        )
        width = await mobile.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, wide  # nothing overflows the page sideways (the chart scrolls in its own box)
        await browser.close()

    assert dialogs == []
    for shot in sorted(shots.iterdir()):
        print(f"screenshot: {shot}")
