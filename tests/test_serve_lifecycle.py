"""`chatledger serve` as a real process through its start and its end: a port in use, a database that is
down at start (and one that can never work), a worker that dies, and SIGTERM while the writer is backlogged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.store.migrate import upgrade_url

from .helpers import eventually, rows_by_request_id
from .test_reliability import CHAT, HEADERS, free_port, serve, write_config
from .upstream import FakeUpstream


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry.name), cmdline))
    return found


async def call(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.post(url + "/v1/chat/completions", data=orjson.dumps(CHAT), headers=HEADERS) as response:
        await response.read()
        return response.status, response.headers.get("X-Ledger-Request-Id", "")


async def health(url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(url + "/_ledger/health") as response:
        body: dict[str, object] = await response.json()
        return body


async def run_serve(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("CHATLEDGER_")},
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


# ---- a port already in use ----------------------------------------------------------------------------


async def test_a_port_in_use_is_one_line_naming_the_port_and_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stdout, stderr = await run_serve("--port", str(port), "--database", str(tmp_path / "ledger.db"))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert f"port {port}" in lines[0]
    assert "--port" in lines[0]
    assert "[server] port" in lines[0]
    assert "listening" not in stderr + stdout
    assert "Traceback" not in stderr


# ---- database URLs that can never work: one line, exit 2 ------------------------------------------------


@pytest.mark.parametrize(
    ("database", "expected"),
    [
        ("mysql://root@127.0.0.1/ledger", "unsupported scheme 'mysql'"),
        ("/nonexistent-directory-for-chatledger/ledger.db", "does not exist"),
    ],
)
async def test_a_database_url_that_can_never_work_is_one_line_and_exit_2(database: str, expected: str) -> None:
    code, stdout, stderr = await run_serve("--port", str(free_port()), "--database", database)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert expected in lines[0]
    assert "listening" not in stderr + stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
async def test_an_unwritable_sqlite_directory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, stderr = await run_serve("--port", str(free_port()), "--database", str(locked / "ledger.db"))
    finally:
        locked.chmod(0o700)
    assert code == 2, stderr
    assert "not writable" in stderr
    assert len(stderr.strip().splitlines()) == 1


# ---- PostgreSQL down at start -------------------------------------------------------------------------


class Forwarder:
    """A TCP forwarder to the real PostgreSQL, started when the test says the database is "up"."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


@pytest.mark.postgres
async def test_serves_while_postgresql_refuses_connections_then_migrates_and_replays(
    upstream: FakeUpstream, postgres_url: str, tmp_path: Path
) -> None:
    from sqlalchemy.engine import make_url

    real = make_url(postgres_url)
    forwarder = Forwarder(free_port(), (real.host or "127.0.0.1", real.port or 5432))
    down_url = real.set(port=forwarder.port).render_as_string(hide_password=False)
    port = free_port()
    config = write_config(tmp_path, upstream.url, down_url, port)
    started = time.monotonic()
    served = await serve(config, tmp_path / "serve.log", port)
    try:
        assert time.monotonic() - started < 20
        state = await health(served.url)
        assert state["status"] == "degraded"
        assert state["database"] == {"reachable": False, "writing": True, "migrated": False} or (
            state["database"]["migrated"] is False  # type: ignore[index]
        )
        assert any("database.migrated=false" in reason for reason in state["reasons"])  # type: ignore[attr-defined]
        async with aiohttp.ClientSession() as session:
            results = [await call(session, served.url) for _ in range(20)]
        assert [status for status, _ in results] == [200] * 20
        await eventually(lambda: any((tmp_path / "spool").glob("spool-*.jsonl")), within=10)

        await forwarder.start()  # the database comes up
        deadline = time.monotonic() + 60
        while (await health(served.url))["status"] != "ok":
            assert time.monotonic() < deadline, served.log_path.read_text()
            await asyncio.sleep(0.25)
        while len(await rows_by_request_id(postgres_url)) < 20:
            assert time.monotonic() < deadline, served.log_path.read_text()
            await asyncio.sleep(0.25)
        rows = await rows_by_request_id(postgres_url)
        assert set(rows) == {request_id for _, request_id in results}
    finally:
        served.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(served.process.wait(), 60)
        await forwarder.stop()
    log_text = served.log_path.read_text()
    assert "database unavailable at start" in log_text
    assert "Traceback" not in log_text


# ---- --workers N: a worker that dies is restarted ------------------------------------------------------


async def test_a_worker_that_dies_is_logged_and_restarted(upstream: FakeUpstream, tmp_path: Path) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"  # a new ledger: serve migrates it once
    port = free_port()
    config = write_config(tmp_path, upstream.url, database_url, port)
    config.write_text(config.read_text().replace("[server]\n", "[server]\nworkers = 2\n"))
    served = await serve(config, tmp_path / "serve.log", port)
    try:

        def workers() -> list[int]:
            return [pid for pid, cmd in children(served.process.pid) if "spawn_main" in cmd]

        await eventually(lambda: len(workers()) == 2, within=20)
        first = workers()
        for pid in first:
            os.kill(pid, signal.SIGKILL)  # both: whatever answers next is a restarted worker
        await eventually(lambda: len(workers()) == 2 and not set(workers()) & set(first), within=20)
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    status, _ = await call(session, served.url)
                    if status == 200:
                        break
                assert time.monotonic() < deadline, served.log_path.read_text()
                await asyncio.sleep(0.1)
        log_text = served.log_path.read_text()
        assert log_text.count("exited with signal SIGKILL") == 2, log_text
        assert "restarted" in log_text
    finally:
        served.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(served.process.wait(), 60)


# ---- SIGTERM with a backlogged writer --------------------------------------------------------------------


@pytest.mark.slow
async def test_sigterm_with_a_stalled_writer_spools_the_backlog_instead_of_dropping_it(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    """The writer process is frozen (SIGSTOP) before the calls: every record waits in the pipe. At SIGTERM
    the serving process gives the writer shutdown_grace, then spools the calls it never read; after a
    restart, replay brings the ledger to exactly the calls the clients saw succeed."""
    await upgrade_url(database_url)
    port = free_port()
    config = write_config(tmp_path, upstream.url, database_url, port)
    config.write_text(config.read_text().replace("shutdown_grace = 15", "shutdown_grace = 2"))
    served = await serve(config, tmp_path / "serve.log", port)
    writer = [pid for pid, cmd in children(served.process.pid) if "proxy.writer.child" in cmd]
    assert len(writer) == 1
    os.kill(writer[0], signal.SIGSTOP)
    n = 300
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(call(session, served.url) for _ in range(n)))
    succeeded = {request_id for status, request_id in results if status == 200}
    assert len(succeeded) == n
    served.process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(served.process.wait(), 60)
    log_text = served.log_path.read_text()
    assert code == 0, log_text
    assert "shut down cleanly" in log_text
    assert f"spooled {n} call(s) the writer process had not read" in log_text

    restarted = await serve(config, tmp_path / "serve2.log", port)
    try:
        deadline = time.monotonic() + 60
        while len(await rows_by_request_id(database_url)) < n:
            assert time.monotonic() < deadline, restarted.log_path.read_text()
            await asyncio.sleep(0.25)
    finally:
        restarted.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(restarted.process.wait(), 60)
    assert set(await rows_by_request_id(database_url)) == succeeded
