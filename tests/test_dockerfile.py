"""The Dockerfile without a Docker engine: it runs as a non-root user, and its HEALTHCHECK command (run
here as it is written) passes against a serving proxy and fails when nothing answers; docs/docker.md's
stop timeout covers the longest shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from proxy.config import Config

from .conftest import Ledger
from .test_reliability import free_port

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def healthcheck_command() -> list[str]:
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", DOCKERFILE.replace("\\\n", " "), re.M | re.S)
    assert match, "no HEALTHCHECK in the Dockerfile"
    command: list[str] = json.loads(match.group(1))
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def test_the_image_runs_as_a_non_root_user() -> None:
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users, "no USER in the Dockerfile"
    assert users[-1] not in ("root", "0")
    assert DOCKERFILE.index("USER ") < DOCKERFILE.index("ENTRYPOINT")


async def test_the_healthcheck_passes_while_serving_and_fails_when_nothing_answers(ledger: Ledger) -> None:
    command = healthcheck_command()
    for port, expected in ((ledger.port, 0), (free_port(), 1)):
        env = {**os.environ, "CHATLEDGER_PORT": str(port)}
        done = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, timeout=30)
        assert done.returncode == expected, done.stderr


def test_docker_docs_stop_timeout_covers_the_longest_shutdown() -> None:
    text = (ROOT / "docs" / "docker.md").read_text()
    timeouts = {int(t) for t in re.findall(r"--stop-timeout (\d+)", text)}
    grace = Config().server.shutdown_grace
    assert timeouts
    assert min(timeouts) > 2 * grace + 15
    assert "[docs/docker.md](docs/docker.md)" in (ROOT / "README.md").read_text()
