"""What chatledger logs: an optional access log (one line per call, written by the writer once the call
is parsed), a rate-limited warning when the upstream is unreachable or times out, and third-party
loggers kept at `library_level` so that `level = "debug"` shows chatledger's own lines."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from proxy.logs import RateLimited, printable

from .conftest import make_config, start_ledger
from .payloads import OPENAI_BASIC
from .test_reliability import Served, free_port, serve, write_config
from .upstream import FakeUpstream, json_reply

KEY = "sk-proj-ACCESSLOG-0123456789abcdef"


async def served_with(upstream: FakeUpstream, tmp_path: Path, logging_lines: str) -> Served:
    port = free_port()
    config = write_config(tmp_path, upstream.url, f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}", port)
    config.write_text(config.read_text().replace('[logging]\nlevel = "info"', "[logging]\n" + logging_lines))
    return await serve(config, tmp_path / "serve.log", port)


async def stop(served: Served) -> str:
    served.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(served.process.wait(), 30) == 0
    return served.log_path.read_text()


async def chat(session: aiohttp.ClientSession, url: str, scenario: str = "basic", query: str = "") -> str:
    async with session.post(
        f"{url}/v1/chat/completions{query}",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {KEY}", "X-Fake-Scenario": scenario},
    ) as response:
        await response.read()
        return response.headers["X-Ledger-Request-Id"]


@pytest.mark.parametrize("enabled", [True, False])
async def test_the_access_log_has_one_line_per_call(upstream: FakeUpstream, tmp_path: Path, enabled: bool) -> None:
    upstream.add("denied", json_reply({"error": {"message": f"bad key {KEY}"}}, status=401))
    served = await served_with(upstream, tmp_path, f'level = "info"\naccess_log = {str(enabled).lower()}')
    async with aiohttp.ClientSession() as session:
        ok = await chat(session, served.url)
        denied = await chat(session, served.url, "denied", f"?key={KEY}&x=1")
    text = await stop(served)
    assert KEY not in text
    lines = [line for line in text.splitlines() if " chatledger.access: " in line]
    if not enabled:
        assert lines == []
        return
    assert len(lines) == 2, text
    usage = OPENAI_BASIC["usage"]
    expected_ok = (
        f"POST /v1/chat/completions 200 ok model={OPENAI_BASIC['model']} "
        f"tokens={usage['prompt_tokens']}+{usage['completion_tokens']} "
    )
    (ok_line,) = [line for line in lines if line.endswith(f"id={ok}")]
    assert expected_ok in ok_line
    assert re.search(r" \d+\.\dms id=", ok_line)
    (denied_line,) = [line for line in lines if line.endswith(f"id={denied}")]
    assert "POST /v1/chat/completions?key=[redacted]&x=1 401 upstream_error model=gpt-4o tokens=-+- " in denied_line


def test_logged_values_are_printable() -> None:
    assert printable("a\r\nFORGED 200 ok\x1b[2J") == "a\\r\\nFORGED 200 ok\\x1b[2J"
    assert printable("x" * 300, 10) == "x" * 10 + "..."


async def test_an_unreachable_upstream_is_a_rate_limited_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.relay import handler

    handler._upstream_trouble = RateLimited(logging.getLogger("chatledger.upstream"), burst=5, period=60.0)
    config = make_config("http://127.0.0.1:1", f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", tmp_path)
    ledger = await start_ledger(config)
    caplog.set_level(logging.INFO)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(12):
                async with session.post(ledger.url + "/v1/chat/completions", json={}) as response:
                    assert response.status == 502
    finally:
        await ledger.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "chatledger.upstream"]
    assert len(warnings) == 5
    assert all(w.startswith("http://127.0.0.1:1: upstream unreachable: ") for w in warnings)
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "chatledger.upstream")


@pytest.mark.slow
async def test_debug_level_is_chatledgers_own_lines(upstream: FakeUpstream, tmp_path: Path) -> None:
    served = await served_with(upstream, tmp_path, 'level = "debug"')
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            await chat(session, served.url)
    text = await stop(served)
    library = re.compile(r" DEBUG (aiosqlite|asyncio|sqlalchemy|alembic)")
    libraries = [line for line in text.splitlines() if library.search(line)]
    assert libraries == [], libraries[:5]
    assert len(text.splitlines()) < 60, text
