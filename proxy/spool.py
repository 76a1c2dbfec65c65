"""Append-only spool on local disk for records the database could not take (yet).

One JSON line per record, in segment files named so that sorting them is replay order. The segment
being written is held under an exclusive flock, so several workers can share a spool directory and
never replay a file another live process is still writing; a crashed process's lock dies with it.
Blocking file work: callers run these methods in a thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import orjson

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"
MAX_SEGMENT_BYTES = 64 * 1024 * 1024


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(type(value).__name__)


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._current: BinaryIO | None = None
        self._current_path: Path | None = None
        self._sequence = 0

    def _open_segment(self) -> BinaryIO:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        name = f"spool-{time.time_ns():020d}-{os.getpid()}-{self._sequence:06d}{SEGMENT_SUFFIX}"
        path = self.directory / name
        handle = open(path, "ab")  # noqa: SIM115 - kept open across appends
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        self._current, self._current_path = handle, path
        return handle

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append rows and fsync; returns how many were written. Raises OSError if the disk refuses."""
        lines = [orjson.dumps(row, default=_default, option=orjson.OPT_APPEND_NEWLINE) for row in rows]
        if not lines:
            return 0
        with self._lock:
            handle = self._current or self._open_segment()
            handle.write(b"".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
            if handle.tell() >= MAX_SEGMENT_BYTES:
                self._close_current()
        return len(lines)

    def rotate(self) -> None:
        """Close the segment being written so it can be replayed."""
        with self._lock:
            self._close_current()

    def _close_current(self) -> None:
        if self._current is not None:
            try:
                self._current.close()  # releases the flock
            finally:
                self._current = None
                self._current_path = None

    def segments(self) -> list[Path]:
        """Closed segments, oldest first (the one being written is not included)."""
        try:
            paths = sorted(self.directory.glob(f"spool-*{SEGMENT_SUFFIX}"))
        except OSError:
            return []
        return [path for path in paths if path != self._current_path]

    def backlog(self) -> tuple[int, int]:
        """(segment files, bytes) waiting in the spool, the open segment included."""
        files = size = 0
        try:
            for path in self.directory.glob(f"spool-*{SEGMENT_SUFFIX}"):
                files += 1
                size += path.stat().st_size
        except OSError:
            pass
        return files, size

    def claim(self, path: Path) -> BinaryIO | None:
        """Open a segment for replay if no live process holds it; the caller releases via release()."""
        try:
            handle = open(path, "rb")  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return None
        if not path.exists():  # replayed and removed by another process between glob and lock
            handle.close()
            return None
        return handle

    @staticmethod
    def read(handle: BinaryIO) -> list[dict[str, Any]]:
        """All complete rows of a claimed segment; a torn last line (crash mid-write) is skipped."""
        rows: list[dict[str, Any]] = []
        handle.seek(0)
        for number, line in enumerate(handle, 1):
            if not line.endswith(b"\n"):
                log.warning("spool %s: skipping torn line %d", handle.name, number)
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("spool %s: skipping unreadable line %d", handle.name, number)
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    @staticmethod
    def release(path: Path, handle: BinaryIO, *, delete: bool) -> None:
        try:
            if delete:
                path.unlink(missing_ok=True)
        finally:
            handle.close()

    def close(self) -> None:
        self.rotate()


def row_from_spool(row: dict[str, Any]) -> dict[str, Any]:
    """Undo the JSON encoding of a spooled row (timestamps and money)."""
    started_at = row.get("started_at")
    if isinstance(started_at, str):
        row["started_at"] = datetime.fromisoformat(started_at)
    cost = row.get("cost")
    if cost is not None:
        row["cost"] = Decimal(str(cost))
    return row
