"""The default writer: a separate process per serving process (`[database] writer = "process"`).

Each test runs the proxy as `serve` does, with a real writer child, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from proxy.credentials import key_fingerprint, redact_fingerprinted
from proxy.parse.capture import Capture
from proxy.parse.record import CompletionRecord
from proxy.runtime import usable_cpus
from proxy.web.metrics import LedgerMetrics
from proxy.writer import ring
from proxy.writer.child import writer_nice
from proxy.writer.framing import PIPE_BYTES, Items
from proxy.writer.link import RecorderLink
from proxy.writer.ring import RingSlice

from .conftest import Ledger, make_config, start_ledger
from .helpers import eventually
from .payloads import OPENAI_BASIC
from .stream_payloads import CASES, OPENAI_INCLUDE_USAGE, OPENROUTER
from .test_reliability import HeldLock
from .test_streaming import _lengthened
from .upstream import FakeUpstream, json_reply, sse_reply

KEY = "sk-test-writer-process-0123456789"
CHAT = "/v1/chat/completions"


@pytest.fixture
async def process_ledger(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = await start_ledger(make_config(upstream.url, database_url, tmp_path, database={"writer": "process"}))
    yield ledger
    await ledger.stop()


def child_pid(ledger: Ledger) -> int:
    process = ledger.recorder._process  # type: ignore[union-attr]
    assert process is not None
    return process.pid


async def test_completions_from_the_openai_client_are_logged_by_the_writer_process(
    process_ledger: Ledger, upstream: FakeUpstream
) -> None:
    for case in (OPENAI_INCLUDE_USAGE, OPENROUTER):
        upstream.add(case.name, sse_reply(case.body))
    client = openai.AsyncOpenAI(base_url=process_ledger.url + "/v1", api_key=KEY, max_retries=0)
    async with client:
        completion = await client.chat.completions.create(model="gpt-4o", messages=[], user="alice")
        assert completion.id == OPENAI_BASIC["id"]
        for case in (OPENAI_INCLUDE_USAGE, OPENROUTER):
            stream = await client.chat.completions.create(
                model="m",
                messages=[],
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Fake-Scenario": case.name, "X-Ledger-Tags": "team=search"},
            )
            async for _ in stream:
                pass
    rows = await process_ledger.rows(count=3)
    assert [row["outcome"] for row in rows] == ["ok", "ok", "ok"]
    first, *streams = rows
    assert first["completion_id"] == OPENAI_BASIC["id"]
    assert first["total_tokens"] == OPENAI_BASIC["usage"]["total_tokens"]
    assert first["user"] == "alice"
    assert first["api_key_hash"] == key_fingerprint(KEY)
    assert first["stream"] is False
    for row, case in zip(streams, (OPENAI_INCLUDE_USAGE, OPENROUTER), strict=True):
        assert row["stream"] is True
        assert row["tags"] == {"team": "search"}
        assert row["ttft_ms"] is not None
        assert 0 < row["ttft_ms"] <= row["duration_ms"]
        for name in ("completion_id", "model", "prompt_tokens", "completion_tokens"):
            assert row[name] == case.row[name], name
        assert [c["finish_reason"] for c in row["choices"]] == [c["finish_reason"] for c in case.choices]


async def test_every_stream_case_parses_the_same_in_the_writer_process(
    process_ledger: Ledger, upstream: FakeUpstream
) -> None:
    async with aiohttp.ClientSession() as session:
        for case in CASES:
            upstream.add(case.name, sse_reply(case.body))
            body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
            async with session.post(
                process_ledger.url + CHAT, json=body, headers={"X-Fake-Scenario": case.name}
            ) as response:
                assert await response.read() == case.body  # byte for byte: nothing held back or cut
    rows = await process_ledger.rows(count=len(CASES))
    for row, case in zip(rows, CASES, strict=True):
        for name, value in case.row.items():
            assert row[name] == value, (case.name, name)


async def test_health_and_metrics_report_the_writer_process(process_ledger: Ledger) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.post(process_ledger.url + CHAT, json={"model": "gpt-4o"}) as response:
                await response.read()
        await process_ledger.rows(count=5)
        async with session.get(process_ledger.url + "/_ledger/health") as response:
            health = await response.json()
        async with session.get(process_ledger.url + "/_ledger/metrics") as response:
            metrics = await response.text()
    assert health["status"] == "ok"
    assert health["rows_written"] == 5
    assert health["queue_depth"] == 0
    assert "chatledger_rows_written_total 5.0" in metrics
    model = OPENAI_BASIC["model"]
    assert f'chatledger_requests_total{{model="{model}",outcome="ok",status="200",upstream=' in metrics
    prompt = OPENAI_BASIC["usage"]["prompt_tokens"] * 5
    upstream = process_ledger.config.upstream.url
    assert f'chatledger_prompt_tokens_total{{model="{model}",upstream="{upstream}"}} {prompt}.0' in metrics


async def test_stopping_drains_every_record_through_the_writer_process(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    upstream.add("slow", json_reply(OPENAI_BASIC))
    config = make_config(upstream.url, database_url, tmp_path, database={"writer": "process"})
    ledger = await start_ledger(config)
    try:
        async with aiohttp.ClientSession() as session:

            async def call() -> None:
                async with session.post(ledger.url + CHAT, json={"model": "m"}) as response:
                    await response.read()

            await asyncio.gather(*(call() for _ in range(200)))
        pid = child_pid(ledger)
    finally:
        await ledger.runner.cleanup()  # no wait_idle: stopping must drain by itself
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child is gone
    rows = await ledger._select()
    await ledger.engine.dispose()
    assert len(rows) == 200
    assert len({row["request_id"] for row in rows}) == 200


async def test_a_killed_writer_process_is_restarted_and_logging_goes_on(
    process_ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    first = child_pid(process_ledger)
    async with aiohttp.ClientSession() as session:
        async with session.post(process_ledger.url + CHAT, json={"model": "before"}) as response:
            await response.read()
        await process_ledger.rows(count=1)
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: child_pid(process_ledger) != first, within=30)  # a new writer process
        await asyncio.wait_for(process_ledger.recorder._ready, 30)  # type: ignore[union-attr]
        async with session.post(process_ledger.url + CHAT, json={"model": "after"}) as response:
            assert response.status == 200  # calls never waited on the writer
            await response.read()
    rows = await process_ledger.rows(count=2)
    assert [row["requested_model"] for row in rows] == ["before", "after"]
    assert any("writer process exited" in r.getMessage() for r in caplog.records)


async def test_long_calls_made_while_the_writer_process_is_down_reach_its_successor(
    process_ledger: Ledger, upstream: FakeUpstream
) -> None:
    """Their reads went into the dead child's shared-memory ring: the new child gets copies through the
    pipe. Here the child is killed while three such calls wait in the outbox."""
    body, reply = _long_stream(200)
    upstream.add("long", reply)
    link = process_ledger.recorder
    link._send_outbox = lambda: None  # type: ignore[union-attr,method-assign]  # hold the calls here
    first = child_pid(process_ledger)
    request = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            headers = {"X-Fake-Scenario": "long"}
            async with session.post(process_ledger.url + CHAT, json=request, headers=headers) as response:
                assert await response.read() == body
        held = list(link._outbox)  # type: ignore[union-attr]
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: child_pid(process_ledger) != first, within=30)
        await asyncio.wait_for(link._ready, 30)  # type: ignore[union-attr]
    del link._send_outbox  # type: ignore[union-attr]
    rows = await process_ledger.rows(count=3)
    assert [type(item.chunks) for item in held] == [RingSlice, RingSlice, RingSlice]  # they were in the ring
    assert len(rows) == 3
    assert {row["completion_tokens"] for row in rows} == {OPENAI_INCLUDE_USAGE.row["completion_tokens"]}
    assert {row["outcome"] for row in rows} == {"ok"}


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the ring needs os.memfd_create (Linux)")
async def test_a_writer_process_that_cannot_be_started_leaves_no_ring_behind(
    upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ring is made before the child: if starting the child fails, the ring's memory and file
    descriptor go with the attempt (a respawn loop must not leak 32 MiB per try)."""
    made: list[ring.RingWriter] = []
    make = ring.RingWriter

    def recording_ring(size: int) -> ring.RingWriter:
        made.append(make(size))
        return made[-1]

    async def no_fork(*args: Any, **kwargs: Any) -> Any:
        raise OSError("fork failed")

    monkeypatch.setattr(ring, "RingWriter", recording_ring)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_fork)
    config = make_config(upstream.url, f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}", tmp_path)
    link = RecorderLink(config, LedgerMetrics().apply)
    with pytest.raises(OSError, match="fork failed"):
        await link.start()
    assert len(made) == 1
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(made[0].fd)  # closed
    assert link._ring is None


async def test_a_key_echoed_in_an_error_is_redacted_by_the_writer_process(
    process_ledger: Ledger, upstream: FakeUpstream
) -> None:
    error = {"error": {"message": f"key {KEY} is not allowed to use this model", "type": "invalid_request_error"}}
    upstream.add("echo", json_reply(error))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            process_ledger.url + CHAT,
            json={"model": "m"},
            headers={"Authorization": f"Bearer {KEY}", "X-Fake-Scenario": "echo"},
        ) as response,
    ):
        assert KEY.encode() in await response.read()  # the client gets the upstream's body as sent
    row = await process_ledger.row()
    assert row["outcome"] == "upstream_error"
    assert KEY not in row["error"]
    assert "[redacted]" in row["error"]


def test_redaction_by_fingerprint_finds_the_key_and_nothing_else() -> None:
    key = "sk-proj-Abc123_xyz-789"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    text = f'invalid key "{key}" (also {key}); not sk-proj-Abc123_xyz-780 nor {key[:-1]}'
    assert redact_fingerprinted(text, [(fingerprint, len(key))]) == (
        'invalid key "[redacted]" (also [redacted]); not sk-proj-Abc123_xyz-780 nor ' + key[:-1]
    )
    glued = f"prefix{key}suffix"  # inside a longer run of key characters
    assert redact_fingerprinted(glued, [(fingerprint, len(key))]) == "prefix[redacted]suffix"
    assert redact_fingerprinted(orjson.dumps({"k": 1}).decode(), [(fingerprint, len(key))]) == '{"k":1}'


def test_the_writer_yields_to_serving_processes_only_while_they_leave_a_core_spare() -> None:
    assert writer_nice(workers=1, cpus=2) == 10
    assert writer_nice(workers=3, cpus=8) == 10
    assert writer_nice(workers=2, cpus=2) == 0  # 2 workers on 2 cores: a nice-10 writer falls behind
    assert writer_nice(workers=1, cpus=1) == 0
    assert writer_nice(workers=4, cpus=2) == 0


def test_usable_cpus_are_capped_by_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    v2, v1, none = tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    (v1 / "cpu").mkdir(parents=True)
    v2.mkdir()
    none.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5
    assert usable_cpus(v2) == min(cpus, 2)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(v2) == cpus
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert usable_cpus(v1) == cpus
    assert usable_cpus(none) == cpus


@pytest.mark.parametrize("spare_core", [True, False])
async def test_the_writer_process_runs_at_the_nice_value_for_the_workers_and_cores(
    upstream: FakeUpstream, tmp_path: Path, spare_core: bool
) -> None:
    cpus = usable_cpus()
    if spare_core and cpus == 1:
        pytest.skip("one usable CPU: no worker count leaves a core spare")
    workers = 1 if spare_core else cpus
    config = make_config(
        upstream.url,
        f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
        tmp_path,
        database={"writer": "process"},
        server={"workers": workers},
    )
    ledger = await start_ledger(config)  # one serving process; the config says how many `serve` runs
    try:
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, child_pid(ledger)) == min(19, ours + (10 if spare_core else 0))
    finally:
        await ledger.stop()


def items_sent(link: Any) -> list[object]:
    """Every item the RecorderLink sends its child from now on, as it goes into the pipe."""
    sent: list[object] = []
    send = link._send

    def spy(message: Any) -> bool:
        if type(message) is Items:
            sent.extend(message.items)
        return bool(send(message))

    link._send = spy
    return sent


async def test_a_writer_that_falls_behind_gets_parsed_records_instead_of_raw_copies(
    upstream: FakeUpstream, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    upstream.add(OPENAI_INCLUDE_USAGE.name, sse_reply(OPENAI_INCLUDE_USAGE.body))
    config = make_config(upstream.url, database_url, tmp_path, database={"writer": "process"})
    ledger = await start_ledger(config)
    try:
        link = ledger.recorder
        link._backlog_bytes = -1  # type: ignore[union-attr]  # always "behind": the serving process parses
        sent = items_sent(link)
        async with aiohttp.ClientSession() as session:
            async with session.post(ledger.url + CHAT, json={"model": "gpt-4o"}) as response:
                await response.read()
            body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
            headers = {"X-Fake-Scenario": OPENAI_INCLUDE_USAGE.name}
            async with session.post(ledger.url + CHAT, json=body, headers=headers) as response:
                assert await response.read() == OPENAI_INCLUDE_USAGE.body
            link._send_outbox()  # type: ignore[union-attr]
            async with session.get(ledger.url + "/_ledger/metrics") as response:
                metrics = await response.text()
        rows = await ledger.rows(count=2)
    finally:
        await ledger.stop()
    assert [type(item) for item in sent] == [CompletionRecord, CompletionRecord]  # no raw copy went out
    assert rows[0]["completion_id"] == OPENAI_BASIC["id"]
    assert rows[1]["completion_id"] == OPENAI_INCLUDE_USAGE.row["completion_id"]
    assert rows[1]["completion_tokens"] == OPENAI_INCLUDE_USAGE.row["completion_tokens"]
    assert any("behind" in r.getMessage() for r in caplog.records)
    assert "chatledger_calls_parsed_in_server_total 2.0" in metrics


async def test_the_pipe_to_the_writer_process_holds_a_streamed_calls_frame(process_ledger: Ledger) -> None:
    """A 200-event stream's frame is ~60 KB, the size of a default pipe: the pipe is widened so that a
    frame goes in one write."""
    stdin = process_ledger.recorder._process.stdin  # type: ignore[union-attr]
    pipe = stdin.transport.get_extra_info("pipe")
    assert fcntl.fcntl(pipe.fileno(), fcntl.F_GETPIPE_SZ) == PIPE_BYTES


async def test_an_inline_writer_has_no_calls_parsed_in_server_metric(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    """Only a writer process can be behind while the serving process parses: /metrics says so only then."""
    for writer, present in (("inline", False), ("process", True)):
        config = make_config(upstream.url, database_url, tmp_path / writer, database={"writer": writer})
        ledger = await start_ledger(config)
        try:
            async with aiohttp.ClientSession() as session, session.get(ledger.url + "/_ledger/metrics") as response:
                metrics = await response.text()
        finally:
            await ledger.stop()
        assert ("chatledger_calls_parsed_in_server_total 0.0" in metrics) is present, writer


def _long_stream(copies: int) -> tuple[bytes, Any]:
    """OPENAI_INCLUDE_USAGE with `copies` more content chunks (~300 bytes each), and the fake upstream's
    scenario that sends it in writes of 3,000 bytes."""
    body = b"".join(_lengthened(OPENAI_INCLUDE_USAGE, copies))
    return body, sse_reply(body, sizes=[3000] * (len(body) // 3000 + 1))


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the ring needs os.memfd_create (Linux)")
async def test_long_responses_reach_the_writer_through_shared_memory_or_the_pipe_when_it_is_full(
    upstream: FakeUpstream, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long response's reads go through the ring (the frame carries only where they are); when the
    ring has no room (here: 256 KiB for 40 streams of ~100 KB at once), through the pipe as before.
    Either way every row is whole."""
    monkeypatch.setattr(ring, "RING_BYTES", ring.DATA_START + 256 * 1024)
    body, reply = _long_stream(330)
    upstream.add("long", reply)
    config = make_config(upstream.url, database_url, tmp_path, database={"writer": "process"})
    ledger = await start_ledger(config)
    try:
        sent = items_sent(ledger.recorder)
        request = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}

        async def call(session: aiohttp.ClientSession) -> None:
            headers = {"X-Fake-Scenario": "long"}
            async with session.post(ledger.url + CHAT, json=request, headers=headers) as response:
                assert await response.read() == body

        async with aiohttp.ClientSession() as session:
            await call(session)
            await ledger.recorder.wait_idle()
            await asyncio.gather(*(call(session) for _ in range(40)))
        rows = await ledger.rows(count=41)
    finally:
        await ledger.stop()
    reads = [item.chunks for item in sent]
    assert type(reads[0]) is RingSlice  # (position, lengths): the first went through the ring
    assert any(type(r) is RingSlice for r in reads[1:])
    assert any(type(r) is list for r in reads[1:])
    assert len(rows) == 41
    for row in rows:
        assert row["completion_id"] == OPENAI_INCLUDE_USAGE.row["completion_id"]
        assert row["completion_tokens"] == OPENAI_INCLUDE_USAGE.row["completion_tokens"]
        assert row["outcome"] == "ok"
        assert [choice["finish_reason"] for choice in row["choices"]] == ["stop"]


@contextlib.asynccontextmanager
async def database_locked(database_url: str) -> AsyncIterator[None]:
    """Another connection holds the completions table: the writer's inserts wait until it lets go."""
    if database_url.startswith("sqlite"):
        async with HeldLock(Path(make_url(database_url).database or "")):
            yield
        return
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            transaction = await conn.begin()
            await conn.execute(text("LOCK TABLE completions IN ACCESS EXCLUSIVE MODE"))
            yield
            await transaction.rollback()
    finally:
        await engine.dispose()


async def test_a_writer_whose_database_lags_makes_the_serving_process_parse(
    upstream: FakeUpstream, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The child reads and parses every frame at once, so the pipe stays empty while records wait in it
    for a slow database (on a saturated machine: a writer at nice 10 starved of CPU). Past a batch and a
    tenth of queue_max records waiting, the serving process parses calls itself, which slows it down and leaves
    the writer the CPU it lacks, instead of records piling up; every row still arrives."""
    database = {"writer": "process", "queue_max": 30, "batch_max": 3, "write_timeout": 30}
    config = make_config(upstream.url, database_url, tmp_path, database=database)
    ledger = await start_ledger(config)
    try:
        link = ledger.recorder
        sent = items_sent(link)
        async with aiohttp.ClientSession() as session, database_locked(database_url):
            for _ in range(40):
                async with session.post(ledger.url + CHAT, json={"model": "gpt-4o"}) as response:
                    assert response.status == 200
                    await response.read()
                await asyncio.sleep(0.02)  # the child reports its queue 4 times a second
            behind = link._was_behind  # type: ignore[union-attr]
        rows = await ledger.rows(count=40, patience=30)
    finally:
        await ledger.stop()
    assert behind
    parsed_here = [item for item in sent if isinstance(item, CompletionRecord)]
    assert type(sent[0]) is Capture
    assert 0 < len(parsed_here) < 40
    assert len(rows) == 40
    assert {row["completion_id"] for row in rows} == {OPENAI_BASIC["id"]}
    assert any("records not yet written" in r.getMessage() for r in caplog.records)
