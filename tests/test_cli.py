"""The `chatledger` command as a real process: serve (startup line, auto-migration, a logged call,
clean exit on SIGTERM/SIGINT), db upgrade / db status from an unrelated directory, --version.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from sqlalchemy import select

from proxy import __version__
from proxy.config import redact_url
from proxy.store.engine import create_engine
from proxy.store.migrate import head_revision
from proxy.store.models import choices_table, completions_table

from .payloads import OPENAI_BASIC
from .upstream import FakeUpstream

STARTUP_TIMEOUT = 30.0


def chatledger_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m proxy`."""
    script = Path(sys.executable).parent / "chatledger"
    if script.is_file():
        return [str(script)]
    found = shutil.which("chatledger")
    return [found] if found else [sys.executable, "-m", "proxy"]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CHATLEDGER_")}


def listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty working directory, far from the source tree and its migrations/."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


@pytest.fixture
def cli_database(database_url: str) -> str:
    """The test database as a user would type it; PostgreSQL gets a password (trust auth ignores it)
    so that the startup line can be checked for redaction."""
    if database_url.startswith("sqlite"):
        return database_url.split(":///", 1)[1]  # a bare file path
    return database_url.replace("postgresql+asyncpg://postgres@", "postgresql://postgres:hunter2@", 1)


async def run(*args: str, cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *chatledger_command(),
        *args,
        cwd=cwd,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@dataclass
class Served:
    process: asyncio.subprocess.Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.process.send_signal(signum)
        _, stderr = await asyncio.wait_for(self.process.communicate(), 30)
        assert self.process.returncode is not None
        return self.process.returncode, stderr.decode()


@pytest.fixture
async def serve(workdir: Path, upstream: FakeUpstream, cli_database: str) -> AsyncIterator[Served]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *chatledger_command(),
        "serve",
        "--port",
        str(port),
        "--upstream",
        upstream.url,
        "--database",
        cli_database,
        cwd=workdir,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    served = Served(process, port)
    try:
        await wait_until_healthy(served)
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_until_healthy(served: Served) -> None:
    deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while True:
            if served.process.returncode is not None:
                stderr = await served.process.stderr.read() if served.process.stderr else b""
                pytest.fail(f"chatledger serve exited with {served.process.returncode}: {stderr.decode()}")
            try:
                async with session.get(served.url + "/_ledger/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert asyncio.get_running_loop().time() < deadline, "chatledger serve did not start"
            await asyncio.sleep(0.05)


async def logged_rows(database_url: str) -> list[dict[str, object]]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = [dict(r._mapping) for r in await conn.execute(select(completions_table))]
            choices = [dict(r._mapping) for r in await conn.execute(select(choices_table))]
    finally:
        await engine.dispose()
    for row in rows:
        row["choices"] = [c for c in choices if c["completion_pk"] == row["id"]]
    return rows


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_logs_a_call_and_exits_cleanly(
    serve: Served, upstream: FakeUpstream, database_url: str, cli_database: str, workdir: Path, signum: int
) -> None:
    client = openai.AsyncOpenAI(base_url=serve.url + "/v1", api_key="sk-cli-test-key", max_retries=0)
    async with client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    completion = raw.parse()
    assert completion.id == OPENAI_BASIC["id"]
    assert raw.content == orjson.dumps(OPENAI_BASIC)
    request_id = raw.headers["X-Ledger-Request-Id"]

    code, stderr = await serve.stop(signum)
    assert code == 0, stderr

    lines = stderr.splitlines()
    startup = [line for line in lines if "listening on" in line]
    assert len(startup) == 1, stderr
    assert lines[0] == startup[0], "the startup line comes first (no migration chatter before it)"
    line = startup[0]
    assert f"http://127.0.0.1:{serve.port}" in line
    assert upstream.url in line
    assert redact_url(database_url.replace("postgres@", "postgres:hunter2@", 1)) in line
    assert "hunter2" not in stderr
    assert "sk-cli-test-key" not in stderr
    assert "Traceback" not in stderr
    assert " ERROR " not in stderr

    # auto-migrated on start (no separate step), and the row was flushed before the exit
    rows = await logged_rows(database_url)
    assert [row["request_id"] for row in rows] == [request_id]
    row = rows[0]
    assert (row["outcome"], row["status_code"], row["completion_id"]) == ("ok", 200, OPENAI_BASIC["id"])
    assert row["prompt_tokens"] == OPENAI_BASIC["usage"]["prompt_tokens"]
    assert [c["finish_reason"] for c in row["choices"]] == ["stop"]
    assert listing(workdir) == []  # nothing dropped into the working directory


async def test_serve_health_and_unknown_ledger_paths(serve: Served, upstream: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(serve.url + "/_ledger/health") as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            health = orjson.loads(await response.read())
        async with session.get(serve.url + "/_ledger/x") as response:
            assert response.status == 404
            assert response.content_type == "application/json"
            error = orjson.loads(await response.read())["error"]
    assert health["version"] == __version__
    assert health["database"]["reachable"] is True
    assert error["code"] == "not_found"
    assert "/_ledger/x" in error["message"]
    assert upstream.requests == []
    code, _ = await serve.stop()
    assert code == 0


async def test_db_upgrade_and_status_from_another_directory(
    workdir: Path, database_url: str, cli_database: str
) -> None:
    code, out, err = await run("db", "status", "--json", "--database", cli_database, cwd=workdir)
    assert code == 0, err
    before = orjson.loads(out)
    assert before["revision"] is None
    assert before["up_to_date"] is False
    assert before["reachable"] is True

    code, out, err = await run("db", "upgrade", "--database", cli_database, cwd=workdir)
    assert code == 0, err
    assert "hunter2" not in out + err
    assert out.strip().endswith("is at revision head")

    code, out, err = await run("db", "status", "--json", "--database", cli_database, cwd=workdir)
    assert code == 0, err
    status = orjson.loads(out)
    assert status["revision"] == head_revision()
    assert status["up_to_date"] is True
    assert status["rows"]["completions"] == 0
    assert status["database"] == redact_url(database_url.replace("postgres@", "postgres:hunter2@", 1))

    code, out, err = await run("db", "status", "--database", cli_database, cwd=workdir)
    assert code == 0, err
    assert f"{head_revision()} (up to date)" in out
    assert "hunter2" not in out

    assert listing(workdir) == []


async def test_version(workdir: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--version",
        cwd=workdir,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr
    assert stdout.decode().strip() == f"chatledger {__version__}"
    code, out, _ = await run("--version", cwd=workdir)
    assert (code, out.strip()) == (0, f"chatledger {__version__}")


async def test_no_command_is_a_usage_error(workdir: Path) -> None:
    code, out, err = await run(cwd=workdir)
    assert code == 2
    assert "usage: chatledger" in err
    assert out == ""
