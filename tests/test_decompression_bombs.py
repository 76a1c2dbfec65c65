"""Compression bombs: a small encoded response that inflates to hundreds of megabytes costs the writer a
bounded amount of memory and time. Every decoder (gzip, deflate, br, zstd) is bounded per call and per
response; past the bound the row is `unparsed` and says why, with what was parsed before it; the fold
of any one stream is bounded too; and a writer process busy with bombs keeps writing other rows."""

from __future__ import annotations

import asyncio
import functools
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.parse.capture import Capture, materialize
from proxy.parse.decoders import DECODE_STEP, MAX_PARSED_BODY, bounded_decoder, decode_reads

from .conftest import Ledger
from .helpers import rows_by_request_id
from .payloads import OPENAI_BASIC
from .test_reliability import free_port, serve, write_config
from .upstream import FakeUpstream, json_reply

CHAT = "/v1/chat/completions"
EVENT = (
    b'data: {"id":"chatcmpl-bomb","object":"chat.completion.chunk","created":1700000000,"model":"bomb-model",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"aaaaaaaa"},"finish_reason":null}]}\n\n'
)
INFLATED = 256 * 1024 * 1024  # what a bomb inflates to: 16 times the bound


def _encode(encoding: str, block: bytes, repeat: int) -> bytes:
    if encoding in ("gzip", "deflate"):
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
        return b"".join(compressor.compress(block) for _ in range(repeat)) + compressor.flush()
    if encoding == "br":
        brotli = pytest.importorskip("brotli")
        if not hasattr(brotli.Decompressor, "can_accept_more_data"):
            pytest.skip("brotli older than 1.2 cannot bound its output: br is left undecoded")
        compressor = brotli.Compressor(quality=4)
        return b"".join(compressor.process(block) for _ in range(repeat)) + compressor.finish()
    zstd = pytest.importorskip("backports.zstd")
    compressor = zstd.ZstdCompressor()
    return b"".join(compressor.compress(block) for _ in range(repeat)) + compressor.flush()


@functools.cache
def bomb(encoding: str, inflated: int = INFLATED, event: bytes = EVENT) -> bytes:
    block = event * (1024 * 1024 // len(event))
    return _encode(encoding, block, inflated // len(block))


def bomb_reply(encoding: str, event_stream: bool = True) -> Any:
    async def scenario(request: web.Request, _body: bytes) -> web.StreamResponse:
        body = bomb(encoding)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream" if event_stream else "application/json",
                "Content-Encoding": encoding,
            }
        )
        await response.prepare(request)
        for start in range(0, len(body), 64 * 1024):
            await response.write(body[start : start + 64 * 1024])
        await response.write_eof()
        return response

    return scenario


ENCODINGS = ["gzip", "deflate", "br", "zstd"]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_decoder_is_bounded_per_call_and_per_response(encoding: str) -> None:
    data = bomb(encoding)
    decoder = bounded_decoder(encoding)
    assert decoder is not None
    produced = []
    for start in range(0, len(data), 64 * 1024):
        produced.append(len(decoder.decode(data[start : start + 64 * 1024])))
        if decoder.over:
            break
    assert decoder.over
    assert sum(produced) == MAX_PARSED_BODY
    small = EVENT * 50
    chunks = [_encode(encoding, small, 1)]
    decoded, _, note = decode_reads(chunks, [0.0], encoding)
    assert b"".join(decoded) == small
    assert note is None
    # one call never returns more than a step past what was asked, however much the input inflates to
    step = bounded_decoder(encoding)
    assert step is not None
    step.limit = DECODE_STEP // 2
    assert len(step.decode(data[:65536])) <= DECODE_STEP // 2


def _capture(chunks: list[bytes], encoding: str | None) -> Capture:
    return Capture(
        "r", time.time(), 0.0, "POST", CHAT, "http://u", "chat", None, (), None, None,
        b'{"model":"m","stream":true}', 200, None, encoding, True, 0.01, chunks, [0.01] * len(chunks), 1.0,
        False, None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(b"data: x\n\n", id="tiny-invalid-events"),
        pytest.param(b":\n\n", id="comments"),
        pytest.param(EVENT.replace(b'"role":"assistant",', b""), id="never-settles"),
        pytest.param(
            b'data: {"id":"c","model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n',
            id="usage-everywhere",
        ),
    ],
)
@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_the_fold_of_one_stream_is_bounded(event: bytes, encoding: str | None) -> None:
    """16 MiB of events of the costliest shapes: each used to be parsed one by one (seconds of CPU)."""
    block = event * (1024 * 1024 // len(event))
    data = block * 16 if encoding is None else bomb("gzip", INFLATED, event)
    chunks = [data[i : i + 64 * 1024] for i in range(0, len(data), 64 * 1024)]
    began = time.process_time()
    record = materialize(_capture(chunks, encoding))
    assert time.process_time() - began < 1.0
    if encoding is not None:
        assert record.outcome == "unparsed"
        assert "over 16 MiB once decoded" in (record.error or "")


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_bomb_through_the_proxy_is_passed_on_and_marked(
    ledger: Ledger, upstream: FakeUpstream, encoding: str
) -> None:
    upstream.add("bomb", bomb_reply(encoding))
    upstream.add("json_bomb", bomb_reply(encoding, event_stream=False))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for scenario in ("bomb", "json_bomb"):
            async with session.post(
                ledger.url + CHAT,
                json={"model": "bomb-model", "messages": [], "stream": scenario == "bomb"},
                headers={"X-Fake-Scenario": scenario},
            ) as response:
                assert response.status == 200
                assert await response.read() == bomb(encoding)  # byte-exact, still encoded
    stream_row, body_row = await ledger.rows(count=2)
    assert stream_row["outcome"] == "unparsed"
    assert stream_row["error"] == "event stream over 16 MiB once decoded; parsed its first 16 MiB"
    assert stream_row["model"] == "bomb-model"  # what came before the bound is parsed
    assert stream_row["completion_id"] == "chatcmpl-bomb"
    assert body_row["outcome"] == "unparsed"
    assert body_row["error"] == "response body over 16 MiB not parsed"


def _peak_rss_of_children(pid: int) -> int:
    """The largest peak RSS (VmHWM, bytes) among a process's children: the writer process."""
    peak = 0
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
    return peak


@pytest.mark.slow
async def test_a_writer_process_busy_with_bombs_keeps_writing_and_health_tells(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Bombs and plain calls at once through `chatledger serve` (writer process): plain calls are answered
    at once, the writer's memory stays bounded (a bomb used to be inflated whole: hundreds of MiB and
    seconds per bomb), every row is written, and /_ledger/health never reports an empty queue while
    rows are still missing."""
    upstream.add("bomb", bomb_reply("gzip"))
    upstream.add("ok", json_reply(OPENAI_BASIC))
    bomb("gzip")  # built before the clock starts
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    port = free_port()
    served = await serve(write_config(tmp_path, upstream.url, database_url, port), tmp_path / "serve.log", port)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            baseline = _peak_rss_of_children(served.process.pid)

            async def call(scenario: str) -> tuple[float, str]:
                began = time.monotonic()
                async with session.post(
                    served.url + CHAT,
                    json={"model": "m", "messages": [], "stream": scenario == "bomb"},
                    headers={"X-Fake-Scenario": scenario},
                ) as response:
                    assert response.status == 200
                    await response.read()
                    return time.monotonic() - began, response.headers["X-Ledger-Request-Id"]

            async def health() -> dict[str, Any]:
                async with asyncio.timeout(2):
                    async with session.get(served.url + "/_ledger/health") as response:
                        return orjson.loads(await response.read())  # type: ignore[no-any-return]

            bombs = [asyncio.create_task(call("bomb")) for _ in range(12)]
            plain: list[tuple[float, str]] = []
            for _ in range(40):
                plain.append(await call("ok"))
                await health()  # the serving process answers at once, whatever the writer is doing
                await asyncio.sleep(0.05)
            await asyncio.gather(*bombs)
            assert max(took for took, _ in plain) < 2.0, plain
            # every call is now handed over: until all 52 rows are in the database or the spool (the
            # guard spools a row still in memory a second after its call), health must say rows wait
            samples = []
            deadline = time.monotonic() + 60
            while (state := await health())["queue_depth"] or state["rows_written"] + state["rows_spooled"] < 52:
                samples.append((state["rows_written"] + state["rows_spooled"], state["queue_depth"]))
                assert time.monotonic() < deadline, state
                await asyncio.sleep(0.05)
            assert all(depth > 0 for saved, depth in samples if saved < 52), samples
            while len(await rows_by_request_id(database_url)) < 52:  # spooled rows are replayed
                assert time.monotonic() < deadline, await health()
                await asyncio.sleep(0.2)
            assert state["status"] == "ok"
            assert state["rows_lost"] == 0
            grew = _peak_rss_of_children(served.process.pid) - baseline
            assert grew < 200 * 1024 * 1024, f"writer grew by {grew / 2**20:.0f} MiB"
    finally:
        served.process.terminate()
        await served.process.wait()
    rows = await rows_by_request_id(database_url)
    assert len(rows) == 52
    outcomes = sorted(row["outcome"] for row in rows.values())
    assert outcomes == ["ok"] * 40 + ["unparsed"] * 12
