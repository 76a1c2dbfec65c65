"""The SQLite file under the writer: deleted or replaced while the writer holds it open.

SQLite keeps writing to an open file after its path is unlinked (an operator's `rm`, a restore that
replaces the file): commits succeed, and every row goes with the deleted inode. The writer compares the
path's (device, inode) with the file it opened, after each commit and on its idle tick. On a change the
batch just committed is treated as failed (it is spooled, and replayed once the file is back), the
engine's connections are dropped, and the file is recreated with its schema. Health reports the event
(`database.file`) until the process restarts: the rows the deleted file held are not in the new one.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from ..store.migrate import upgrade

log = logging.getLogger(__name__)


class FileReplaced(OSError):
    """The SQLite file was deleted or replaced: what was just committed went with the old file."""


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


class SqliteFileWatch:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity = _identity(path)
        self.stale = False  # the engine's connections hold a file that is no longer at `path`
        self.problem: str | None = None

    @classmethod
    def for_engine(cls, engine: AsyncEngine) -> SqliteFileWatch | None:
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return cls(Path(database))

    def check(self) -> bool:
        """True (and stale from now on) when the file at the path is not the one the writer opened."""
        if self.stale:
            return True
        now = _identity(self.path)
        if now == self._identity:
            return False
        if self._identity is None:  # created since the watch started (the first migration)
            self._identity = now
            return False
        self.stale = True
        what = "deleted" if now is None else "replaced"
        self.problem = (
            f"{self.path} was {what} under the writer at {time.strftime('%Y-%m-%d %H:%M:%S')}; "
            "recreated, and rows since spooled and replayed (rows the old file held are not in the new one)"
        )
        log.error("the SQLite file %s was %s while open; recreating it and replaying what went to it", self.path, what)
        return True

    def raise_if_replaced(self) -> None:
        if self.check():
            raise FileReplaced(f"the SQLite file {self.path} was deleted or replaced")

    async def reopen(self, engine: AsyncEngine) -> None:
        """Drop the connections to the old file; create the new one with its schema."""
        await engine.dispose()
        await upgrade(engine)
        self._identity = _identity(self.path)
        self.stale = False
        log.warning("the SQLite file %s is back (recreated with its schema)", self.path)
