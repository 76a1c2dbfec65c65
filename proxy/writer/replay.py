"""Walking the spool for replay: its closed segments oldest first, a chunk of rows at a time.

A segment is claimed (flock) while it is read, so two processes sharing a spool never replay the same
one, and deleted once every row of it is in the database. What to do with a chunk (insert it, set
refused rows aside) is the recorder's business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..store.rows import row_from_json
from .errors import describe, is_data_error
from .spool import Spool

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Segment:
    path: Path
    handle: BinaryIO
    rows: list[dict[str, Any]]
    position: int = 0


class SpoolReplay:
    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._segment: _Segment | None = None

    @property
    def active(self) -> bool:
        """A segment is claimed and partly replayed."""
        return self._segment is not None

    async def next_chunk(self, size: int) -> list[dict[str, Any]] | None:
        """The next rows to replay (claiming the oldest segment when none is claimed); None when the spool
        holds nothing to replay."""
        if self._segment is None:
            self._segment = await self._claim_next()
            if self._segment is None:
                return None
        segment = self._segment
        return segment.rows[segment.position : segment.position + size]

    async def advance(self, count: int) -> None:
        """`count` rows of the chunk are in: move on, and delete the segment once all of it is."""
        segment = self._segment
        assert segment is not None
        segment.position += count
        if segment.position >= len(segment.rows):
            self._segment = None
            await asyncio.to_thread(self._spool.release, segment.path, segment.handle, delete=True)
            log.info("replayed %d record(s) from %s", len(segment.rows), segment.path.name)

    def release(self) -> None:
        """Give up the claim without deleting (shutdown): the segment is replayed whole next time."""
        if self._segment is not None:
            self._spool.release(self._segment.path, self._segment.handle, delete=False)
            self._segment = None

    async def _claim_next(self) -> _Segment | None:
        spool = self._spool
        await asyncio.to_thread(spool.rotate)
        for path in await asyncio.to_thread(spool.segments):
            handle = await asyncio.to_thread(spool.claim, path)
            if handle is None:
                continue
            try:
                rows = [row_from_json(row) for row in await asyncio.to_thread(Spool.read, handle)]
            except OSError as exc:
                log.error("cannot read spool segment %s: %s", path, exc)
                await asyncio.to_thread(spool.release, path, handle, delete=False)
                continue
            return _Segment(path, handle, rows)
        return None


async def split_refused(
    chunk: list[dict[str, Any]], insert: Callable[[list[dict[str, Any]]], Awaitable[None]]
) -> list[dict[str, Any]]:
    """Insert a chunk; when the database refuses it for its data, row by row. Returns the rows it refused,
    each with the reason in `_error`. Any other failure (the database went away) is raised."""
    try:
        await insert(chunk)
        return []
    except Exception as exc:
        if not is_data_error(exc):
            raise
    refused: list[dict[str, Any]] = []
    for row in chunk:
        try:
            await insert([row])
        except Exception as exc:
            if not is_data_error(exc):
                raise
            refused.append({**row, "_error": describe(exc)})
    return refused
