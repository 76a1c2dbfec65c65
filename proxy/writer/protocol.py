"""The recorder interface the proxy talks to, whichever writer runs behind it.

`BatchRecorder` (recorder.py) writes in the serving process; `RecorderLink` (link.py) hands everything to
a writer process that runs a BatchRecorder. Both take Captures or finished records, never block, and
report their state as one `WriterStats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..parse import Capture, CompletionRecord
from .spool import Spool


@dataclass(slots=True)
class WriterStats:
    """The writer's counters and state, as /_ledger/health and /_ledger/metrics show them."""

    rows_written: int = 0
    rows_spooled: int = 0
    rows_replayed: int = 0
    rows_rejected: int = 0
    rows_lost: int = 0
    queue_depth: int = 0  # records submitted and not yet in the database or the spool
    database_ok: bool = True
    spool_ok: bool = True
    degraded: bool = False
    last_error: str | None = None
    file_problem: str | None = None  # the SQLite file was replaced or deleted under the writer (until reopened)
    calls_parsed_in_server: int | None = None  # only with a writer process: calls parsed while it was behind


class Recorder(Protocol):
    spool: Spool  # read by health for the backlog on disk

    def submit(self, item: Capture | CompletionRecord) -> None:
        """Hand a call over; never blocks, never raises."""

    def stats(self) -> WriterStats: ...

    async def start(self) -> None: ...

    async def wait_idle(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until everything submitted so far is in the database or the spool."""

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Drain to the database (or the spool) and stop."""
