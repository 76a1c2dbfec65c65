"""The spool on its own: durable appends, replay order, locks between processes, torn writes."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from proxy.store.rows import row_from_json as row_from_spool
from proxy.writer import spool as spool_module
from proxy.writer.spool import Spool, count_lines, encode_row


def rows(*ids: str) -> list[dict[str, object]]:
    return [
        {"request_id": i, "cost": Decimal("0.0000015"), "started_at": "2025-01-01T00:00:00+00:00"}
        for i in ids
    ]


def read_all(spool: Spool) -> list[str]:
    out = []
    for path in spool.segments():
        handle = spool.claim(path)
        assert handle is not None
        out += [row["request_id"] for row in Spool.read(handle)]
        spool.release(path, handle, delete=False)
    return out


def test_append_rotate_and_read_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.append([]) == 0
    assert not (tmp_path / "spool").exists()
    assert spool.append(rows("a", "b")) == 2
    assert spool.segments() == []  # the segment being written is not replayable
    assert spool.backlog()[0] == 1
    spool.rotate()
    assert spool.append(rows("c")) == 1
    spool.rotate()
    assert read_all(spool) == ["a", "b", "c"]
    assert spool.backlog() == (2, sum(p.stat().st_size for p in spool.segments()))


def test_row_round_trip_restores_money_and_time(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(rows("a"))
    spool.close()
    (path,) = spool.segments()
    handle = spool.claim(path)
    assert handle is not None
    (row,) = [row_from_spool(r) for r in Spool.read(handle)]
    spool.release(path, handle, delete=True)
    assert row["cost"] == Decimal("0.0000015")
    assert row["started_at"] == datetime(2025, 1, 1, tzinfo=UTC)
    assert not path.exists()


def test_row_from_spool_leaves_bad_values_for_the_database_to_refuse() -> None:
    row = row_from_spool({"started_at": "not a date", "cost": "lots"})
    assert row == {"started_at": "not a date", "cost": "lots"}


def test_encode_row_never_fails() -> None:
    assert orjson.loads(encode_row({"a": {1, 2}.__class__.__name__})) == {"a": "set"}
    line = encode_row({"a": 2**70, "b": object.__name__})
    assert line.endswith(b"\n")
    assert orjson.loads(line)["b"] == "object"


def test_torn_and_garbled_lines_are_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(rows("a"))
    spool.close()
    (path,) = spool.segments()
    with open(path, "ab") as handle:
        handle.write(b"not json\n[1, 2]\n")
        handle.write(b'{"request_id": "torn')
    assert read_all(spool) == ["a"]
    assert count_lines(path) == 3


def test_failed_write_is_cut_off_and_never_swallows_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    spool.append(rows("a"))
    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        spool.append(rows("b"))
    monkeypatch.setattr(spool_module.os, "fsync", real_fsync)
    assert calls["n"] == 1
    spool.append(rows("c"))
    spool.close()
    assert read_all(spool) == ["a", "c"]  # "b" was reported as failed; "c" is intact


def test_segment_locked_by_another_process_is_not_claimed(tmp_path: Path) -> None:
    path = tmp_path / "spool-00000000000000000001-1-000001.jsonl"
    path.write_bytes(orjson.dumps({"request_id": "x"}) + b"\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,sys,time;f=open(sys.argv[1],'ab');fcntl.flock(f,fcntl.LOCK_EX);"
            "print('locked',flush=True);sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        assert Spool(tmp_path).claim(path) is None
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    # the holder is gone (as after a crash): its lock died with it
    spool = Spool(tmp_path)
    handle = spool.claim(path)
    assert handle is not None
    with open(path, "rb") as other, pytest.raises(BlockingIOError):  # our claim excludes everyone else
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    spool.release(path, handle, delete=True)
    assert not path.exists()


def test_claim_of_a_vanished_segment(tmp_path: Path) -> None:
    assert Spool(tmp_path).claim(tmp_path / "spool-gone.jsonl") is None


def test_rejected_rows_are_kept_apart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.reject([{"request_id": "bad", "_error": "IntegrityError: NOT NULL"}])
    assert path.name.startswith("rejected-")
    assert spool.segments() == []  # never replayed
    assert spool.rejected() == (1, path.stat().st_size)
    assert orjson.loads(path.read_bytes()) == {"request_id": "bad", "_error": "IntegrityError: NOT NULL"}


def test_unwritable_directory_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "spool"
    blocker.write_text("not a directory")
    spool = Spool(blocker)
    with pytest.raises(FileExistsError):
        spool.append(rows("a"))
    assert spool.backlog() == (0, 0)
    assert spool.segments() == []
