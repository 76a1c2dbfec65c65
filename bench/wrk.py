"""Running wrk (Debian package `wrk`) with a Lua script that POSTs the fixed body and prints JSON stats.

wrk counts completed responses; requests still in flight when it stops are cut, so a logging proxy may
hold up to `connections` more rows than wrk's count for each run (they are logged as client_disconnected
or, when the answer was already written, as ok).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .loadgen import AUTH

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%(auth)s"
local f = assert(io.open("%(body)s", "rb"))
wrk.body = f:read("*a")
f:close()

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"mean_us":%%f,"max_us":%%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def write_script(directory: Path, name: str, body: bytes) -> Path:
    """A Lua script POSTing `body` (kept in a file next to it)."""
    directory.mkdir(parents=True, exist_ok=True)
    body_file = directory / f"{name}.body"
    body_file.write_bytes(body)
    script = directory / f"{name}.lua"
    script.write_text(LUA % {"auth": AUTH, "body": body_file})
    return script


def run_wrk(
    url: str, script: Path, connections: int, duration: float, timeout: float = 30.0
) -> dict[str, Any]:
    """One wrk run (one thread); returns requests, rps, latency percentiles in ms and error counts."""
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not installed")
    command = [
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        f"{int(timeout)}s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + timeout + 30, check=False
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    raw = json.loads(line[len("WRKJSON ") :])
    seconds = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    return {
        "tool": "wrk",
        "connections": connections,
        "duration": seconds,
        "requests": raw["requests"],
        "errors": errors,
        "error_detail": {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]},
        "rps": raw["requests"] / seconds if seconds else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "bytes": raw["bytes"],
    }
