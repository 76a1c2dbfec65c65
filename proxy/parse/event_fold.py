"""What the stream folds of named-event APIs (Responses, Anthropic Messages) share.

Such a stream has a few events that carry the record (the start, the end, usage, errors) among many
content deltas that matter only for the time of the first one. Once that is known the fold is
`settled`: a delta is then passed over by its event name, without parsing, and whole runs of blocks
that hold none of the format's markers are not even decoded (`quiet`).
"""

from __future__ import annotations

from typing import Any

import orjson

from .record import ChoiceRecord, CompletionRecord

STREAM_CUT_OFF = "stream ended before the response finished (no terminal event)"
_ESCAPE = b"\\u"  # a \\u escape could spell a marker: such blocks are always parsed


class EventFolder:
    """The common state of a named-event fold; subclasses define MARKERS, KEY_EVENTS and `_fold`.

    MARKERS: byte strings at least one of which is in every event the fold needs once settled.
    KEY_EVENTS: event names always parsed; any other event is skipped once settled."""

    MARKERS: tuple[bytes, ...] = ()
    KEY_EVENTS: frozenset[bytes] = frozenset()

    __slots__ = ("choice", "content_seen", "data_events", "done", "failed", "parsed_events", "record", "settled")

    def __init__(self, record: CompletionRecord) -> None:
        self.record = record
        self.settled = False
        self.done = False
        self.failed = False
        self.content_seen = False
        self.data_events = 0
        self.parsed_events = 0
        self.choice: ChoiceRecord | None = None

    def feed(self, data: bytes, event: bytes = b"") -> tuple[bool, bool]:
        """Fold one event; returns (carries_content, False): these streams have no chunk to strip."""
        if data.startswith(b"[DONE]"):  # not part of these formats, but a gateway may end with it
            self.done = True
            return False, False
        self.data_events += 1
        if self.settled and event and event not in self.KEY_EVENTS:
            return False, False
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False, False
        if not isinstance(obj, dict):
            return False, False
        self.parsed_events += 1
        carries_content = self._fold(obj)
        if carries_content and not self.content_seen:
            self.content_seen = self.settled = True
        return carries_content, False

    def _fold(self, obj: dict[str, Any]) -> bool:
        """Fold one parsed event; returns whether it carries content."""
        raise NotImplementedError

    def the_choice(self) -> ChoiceRecord:
        """These APIs answer with one message: one choice row, index 0."""
        if self.choice is None:
            self.choice = ChoiceRecord(0, role="assistant")
            self.record.choices.append(self.choice)
        return self.choice

    def fail(self, message: str) -> None:
        self.failed = True
        self.record.error = self.record.error or message

    def finish(self, at_eof: bool = False) -> None:
        """at_eof: the upstream ended the stream normally; without a terminal event it was cut off."""
        if at_eof and not self.done:
            self.fail(STREAM_CUT_OFF)

    def quiet(self, blocks: bytes) -> bool:
        """Whole SSE blocks of a settled fold (LF only) that certainly change nothing: no marker in them."""
        if not self.settled or _ESCAPE in blocks:
            return False
        return not any(marker in blocks for marker in self.MARKERS)

    def quiet_prefix(self, data: bytes, keep: int) -> int:
        """How many leading bytes of the rest of a stream (whole blocks) change nothing: the blocks before
        the first marker (every event the fold needs holds one, so nothing need be kept for the end)."""
        if not self.settled:
            return 0
        first = data.find(_ESCAPE)
        first = len(data) if first < 0 else first
        for marker in self.MARKERS:
            at = data.find(marker, 0, first)
            if at >= 0:
                first = at
        return data.rfind(b"\n\n", 0, first) + 2
