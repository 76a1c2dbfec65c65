"""`chatledger db status`: migration revision, row counts and spool backlog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from ..config import Config, default_spool_dir, redact_url
from ..store.engine import create_engine
from ..store.migrate import current_revision, head_revision
from ..store.models import ApiKey, Completion, CompletionChoice, Price
from ..writer.spool import REJECTED_GLOB, SEGMENT_GLOB, count_lines
from .escape import terminal_text


def _spool_files(directory: Path, pattern: str) -> dict[str, int]:
    files = records = size = 0
    paths = sorted(directory.glob(pattern)) if directory.is_dir() else []
    for path in paths:
        try:
            size += path.stat().st_size
            records += count_lines(path)
        except OSError:
            continue
        files += 1
    return {"files": files, "records": records, "bytes": size}


def _spool_backlog(config: Config) -> dict[str, Any]:
    """Records waiting for replay, and records set aside because the database refused them."""
    directory = default_spool_dir(config.database)
    backlog: dict[str, Any] = {"directory": str(directory)}
    backlog.update(_spool_files(directory, SEGMENT_GLOB))
    backlog["rejected"] = _spool_files(directory, REJECTED_GLOB)
    return backlog


async def database_status(config: Config) -> dict[str, Any]:
    engine = create_engine(config.database.url)
    status: dict[str, Any] = {"database": redact_url(config.database.url), "head_revision": head_revision()}
    try:
        status["revision"] = await current_revision(engine)
        counts: dict[str, int | None] = {}
        if status["revision"] is not None:
            async with engine.connect() as conn:
                for name, model in (
                    ("completions", Completion),
                    ("completion_choices", CompletionChoice),
                    ("prices", Price),
                    ("api_keys", ApiKey),
                ):
                    counts[name] = (await conn.execute(select(func.count()).select_from(model))).scalar_one()
        status["rows"] = counts
        status["reachable"] = True
    except Exception as exc:
        status["reachable"] = False
        status["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        await engine.dispose()
    status["up_to_date"] = status.get("revision") == status["head_revision"]
    status["spool"] = _spool_backlog(config)
    return status


def format_status(status: dict[str, Any]) -> str:
    lines = [f"database:  {status['database']}"]
    if not status.get("reachable"):
        lines.append(f"reachable: no ({status.get('error')})")
    else:
        current = status.get("revision") or "none (run `chatledger db upgrade`)"
        note = "up to date" if status["up_to_date"] else f"head is {status['head_revision']}"
        lines.append(f"revision:  {current} ({note})")
        for name, count in status.get("rows", {}).items():
            lines.append(f"{name + ':':<20} {count:>12,}")
    spool = status["spool"]
    lines.append(
        f"spool:     {spool['records']:,} record(s) in {spool['files']} file(s), {spool['bytes']:,} bytes "
        f"({spool['directory']})"
    )
    rejected = spool["rejected"]
    if rejected["records"]:
        lines.append(
            f"rejected:  {rejected['records']:,} record(s) the database refused, in {rejected['files']} "
            f"rejected-*.jsonl file(s)"
        )
    return "\n".join(terminal_text(line) for line in lines)
