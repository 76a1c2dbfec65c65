"""The copies of responses in flight share one budget per serving process (`server.copy_budget_mb`): past
it, an event stream keeps its head and tail only (and is still parsed), a plain body is not kept (its row
says why), the budget's count returns to zero after a burst, and so does the memory of a real serving
process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.relay.copies import BUDGET_NOTE, STREAM_HEAD_BYTES, STREAM_TAIL_BYTES
from proxy.web.appkeys import FORWARDER

from .conftest import make_config, start_ledger
from .helpers import eventually, rows_by_request_id
from .payloads import OPENAI_BASIC
from .test_reliability import free_port, serve, write_config
from .test_upstream_faults import vm_kib
from .upstream import FakeUpstream

CHAT = "/v1/chat/completions"
MiB = 1024 * 1024
USAGE = {"stream_options": {"include_usage": True}}  # asked for: the client gets the stream as sent


def long_stream(size: int) -> bytes:
    """A valid OpenAI stream of about `size` bytes: role, many content deltas, finish, usage, [DONE]."""
    base = {"id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}

    def event(choices: list[Any], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    head = event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    delta = event([{"index": 0, "delta": {"content": "word " * 40}, "finish_reason": None}])
    tail = (
        event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        + event([], usage={"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33})
        + b"data: [DONE]\n\n"
    )
    return head + delta * (size // len(delta)) + tail


def streaming(data: bytes, release: asyncio.Event | None = None) -> Any:
    async def scenario(request: web.Request, _body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        half = len(data) // 2
        for start in range(0, len(data), 64 * 1024):
            if release is not None and half <= start < half + 64 * 1024:
                await release.wait()  # every response is half sent before any finishes: a real burst
            await response.write(data[start : start + 64 * 1024])
        await response.write_eof()
        return response

    return scenario


def whole_body(data: bytes, release: asyncio.Event) -> Any:
    async def scenario(request: web.Request, _body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(data[:-10])
        await release.wait()
        await response.write(data[-10:])
        await response.write_eof()
        return response

    return scenario


async def test_past_the_budget_copies_keep_head_and_tail(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    release = asyncio.Event()
    stream = long_stream(3 * MiB)
    body = orjson.dumps({**OPENAI_BASIC, "pad": "x" * (2 * MiB)})
    upstream.add("stream", streaming(stream, release))
    upstream.add("body", whole_body(body, release))
    config = make_config(upstream.url, database_url, tmp_path, server={"copy_budget_mb": 4})
    ledger = await start_ledger(config)
    budget = ledger.app[FORWARDER]._copies
    try:
        async with aiohttp.ClientSession() as session:

            async def call(scenario: str) -> bytes:
                async with session.post(
                    ledger.url + CHAT,
                    json={"model": "m", "messages": [], "stream": scenario == "stream", **USAGE},
                    headers={"X-Fake-Scenario": scenario},
                ) as response:
                    return await response.read()

            calls = [asyncio.create_task(call("stream")) for _ in range(6)]
            calls += [asyncio.create_task(call("body")) for _ in range(2)]
            await eventually(lambda: len(upstream.requests) == 8 and budget.used >= 4 * MiB)
            await asyncio.sleep(0.3)
            # 8 responses of 2-3 MiB in flight: without a budget they would hold about 20 MiB
            assert budget.used <= 4 * MiB + 8 * (STREAM_HEAD_BYTES + STREAM_TAIL_BYTES + 64 * 1024)
            release.set()
            answers = await asyncio.gather(*calls)
        assert answers[:6] == [stream] * 6  # the client's bytes are never touched
        assert answers[6:] == [body] * 2
        assert budget.used == 0
        rows = await ledger.rows(count=8)
    finally:
        await ledger.stop()
    streams = [row for row in rows if row["stream"]]
    assert [(r["outcome"], r["choices"][0]["finish_reason"], r["total_tokens"]) for r in streams] == [
        ("ok", "stop", 33)
    ] * 6
    bodies = [row for row in rows if not row["stream"]]
    assert any(row["outcome"] == "unparsed" and row["error"] == BUDGET_NOTE for row in bodies), bodies


@pytest.mark.slow
async def test_a_burst_of_large_streams_leaves_a_serving_process_its_memory(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """40 concurrent 15 MiB streams through `chatledger serve`: the serving process's peak stays near its
    budget, and its memory goes back down after the burst."""
    if not Path("/proc/self/status").exists():  # noqa: ASYNC240
        pytest.skip("needs /proc to read the proxy's memory")
    release = asyncio.Event()
    stream = long_stream(15 * MiB)
    upstream.add("stream", streaming(stream, release))
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    port = free_port()
    config = write_config(tmp_path, upstream.url, database_url, port)
    config.write_text(config.read_text().replace("[server]\n", "[server]\ncopy_budget_mb = 32\n"))
    served = await serve(config, tmp_path / "serve.log", port)
    pid = served.process.pid
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(served.url + "/_ledger/health") as response:
                assert response.status == 200
            baseline = vm_kib(pid, "VmRSS")

            async def call() -> tuple[int, str]:
                async with session.post(
                    served.url + CHAT,
                    json={"model": "m", "messages": [], "stream": True, **USAGE},
                    headers={"X-Fake-Scenario": "stream"},
                ) as response:
                    size = 0
                    async for chunk in response.content.iter_chunked(MiB):
                        size += len(chunk)
                    return size, response.headers["X-Ledger-Request-Id"]

            calls = [asyncio.create_task(call()) for _ in range(40)]
            await eventually(lambda: len(upstream.requests) == 40)
            await asyncio.sleep(1.0)
            release.set()
            results = await asyncio.gather(*calls)
            assert [size for size, _ in results] == [len(stream)] * 40
            peak = vm_kib(pid, "VmHWM")
            await asyncio.sleep(3)  # the allocator is asked to hand back what the burst left
            after = vm_kib(pid, "VmRSS")
        print(f"serving process RSS: {baseline // 1024} MiB before, peak {peak // 1024}, after {after // 1024}")
        assert (peak - baseline) / 1024 < 250, (baseline, peak)  # 40 x 7.5 MiB held at once without a budget
        assert (after - baseline) / 1024 < 64, (baseline, after)
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.process.wait(), 30) == 0
    rows = await rows_by_request_id(database_url)
    assert sorted(rows) == sorted(request_id for _, request_id in results)
    assert {(row["outcome"], row["total_tokens"]) for row in rows.values()} == {("ok", 33)}
