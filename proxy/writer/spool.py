"""Append-only spool on local disk for records the database could not take (yet).

One JSON line per record, in segment files named so that sorting them is replay order. The segment
being written is held under an exclusive flock, so several workers can share a spool directory and
never replay a file another live process is still writing; a crashed process's lock dies with it.
Rows the database refuses for their content are set aside in `rejected-*.jsonl` files (never
replayed automatically) so one bad row cannot block the rest.
A spool directory deleted while in use (its open segment then takes appends into an unlinked file) is
noticed before each append and by check(): it is recreated, and the records this process had spooled
into it and not yet replayed are counted (take_vanished) so the writer reports them as lost.
Blocking file work: callers run these methods in a thread.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import orjson

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"
SEGMENT_GLOB = f"spool-*{SEGMENT_SUFFIX}"
REJECTED_GLOB = f"rejected-*{SEGMENT_SUFFIX}"
MAX_SEGMENT_BYTES = 64 * 1024 * 1024
_COUNT_CHUNK = 1024 * 1024


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(type(value).__name__)


def encode_row(row: dict[str, Any]) -> bytes:
    """One JSON line; a value orjson refuses falls back to the json module, so encoding never fails."""
    try:
        return orjson.dumps(row, default=_default, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return json.dumps(row, default=str, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def encode_rows(rows: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(encode_row(row) for row in rows)


def _fsync_directory(directory: Path) -> None:
    """Make a new file's name durable, not only its bytes."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def count_lines(path: Path) -> int:
    """Records in a spool file without loading it whole."""
    lines = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_COUNT_CHUNK):
            lines += chunk.count(b"\n")
    return lines


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._current: BinaryIO | None = None
        self._current_path: Path | None = None
        self._sequence = 0
        self._directory_id: tuple[int, int] | None = None  # (device, inode) of the directory in use
        self._unreplayed: dict[Path, int] = {}  # records this process appended, per segment, not yet replayed
        self._vanished = 0

    def _new_name(self, prefix: str) -> Path:
        self._sequence += 1
        name = f"{prefix}-{time.time_ns():020d}-{os.getpid()}-{self._sequence:06d}{SEGMENT_SUFFIX}"
        return self.directory / name

    def _open_segment(self) -> BinaryIO:
        self.directory.mkdir(parents=True, exist_ok=True)
        stat = os.stat(self.directory)
        self._directory_id = (stat.st_dev, stat.st_ino)
        path = self._new_name("spool")
        handle = open(path, "ab")  # noqa: SIM115 - kept open across appends
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        _fsync_directory(self.directory)
        self._current, self._current_path = handle, path
        return handle

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append rows and fsync; returns how many were written. Raises if the disk refuses.

        A failed write is cut back off the segment (or the segment abandoned), so a torn line can
        never swallow the next append.
        """
        data = encode_rows(rows)
        if not data:
            return 0
        with self._lock:
            self._check_directory()
            handle = self._current or self._open_segment()
            start = handle.tell()
            try:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException:
                try:
                    handle.truncate(start)
                    handle.flush()
                except OSError:
                    pass
                self._close_current()
                raise
            count = data.count(b"\n")
            if self._current_path is not None:
                self._unreplayed[self._current_path] = self._unreplayed.get(self._current_path, 0) + count
            if handle.tell() >= MAX_SEGMENT_BYTES:
                self._close_current()
        return count

    def check(self) -> None:
        """Notice a deleted spool directory now (see take_vanished)."""
        with self._lock:
            self._check_directory()

    def take_vanished(self) -> int:
        """Records lost with a deleted spool directory since the last call."""
        with self._lock:
            lost, self._vanished = self._vanished, 0
            return lost

    def _check_directory(self) -> None:
        if self._directory_id is None:
            return
        try:
            stat = os.stat(self.directory)
            same = (stat.st_dev, stat.st_ino) == self._directory_id
        except FileNotFoundError:
            same = False
        if same:
            return
        lost = sum(count for path, count in self._unreplayed.items() if not path.exists())
        self._unreplayed.clear()
        self._vanished += lost
        self._directory_id = None
        self._close_current()  # its file went with the directory; the next append opens one in a new one
        log.error("the spool directory %s was deleted with %d record(s) not yet replayed", self.directory, lost)

    def reject(self, rows: list[dict[str, Any]]) -> Path:
        """Set rows aside in a new rejected-*.jsonl file (fsynced); they are not replayed."""
        data = encode_rows(rows)
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._new_name("rejected")
        with open(path, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_directory(self.directory)
        return path

    def probe(self) -> None:
        """Check the directory takes a file now (after a failure); raises if it does not."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f".probe-{os.getpid()}"
        with open(path, "wb") as handle:
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        path.unlink()

    def rotate(self) -> None:
        """Close the segment being written so it can be replayed."""
        with self._lock:
            self._close_current()

    def _close_current(self) -> None:
        if self._current is not None:
            try:
                self._current.close()  # releases the flock
            except OSError:
                pass
            finally:
                self._current = None
                self._current_path = None

    def segments(self) -> list[Path]:
        """Closed segments, oldest first (the one being written is not included)."""
        try:
            paths = sorted(self.directory.glob(SEGMENT_GLOB))
        except OSError:
            return []
        return [path for path in paths if path != self._current_path]

    def backlog(self) -> tuple[int, int]:
        """(segment files, bytes) waiting in the spool, the open segment included."""
        return _files_and_bytes(self.directory, SEGMENT_GLOB)

    def rejected(self) -> tuple[int, int]:
        """(files, bytes) of rows set aside because the database refused them."""
        return _files_and_bytes(self.directory, REJECTED_GLOB)

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
                log.error("spool %s: skipping unreadable line %d", handle.name, number)
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def release(self, path: Path, handle: BinaryIO, *, delete: bool) -> None:
        try:
            if delete:
                path.unlink(missing_ok=True)
                with self._lock:
                    self._unreplayed.pop(path, None)
        finally:
            handle.close()

    def close(self) -> None:
        self.rotate()


def _files_and_bytes(directory: Path, pattern: str) -> tuple[int, int]:
    files = size = 0
    try:
        for path in directory.glob(pattern):
            try:
                size += path.stat().st_size
            except OSError:
                continue
            files += 1
    except OSError:
        pass
    return files, size
