"""Chat completions as an SSE stream (and legacy text completions, whose chunks carry `text` for
`delta`): chunks folded into one record as they arrive.

Identity fields come from the first chunk that has them, finish reasons per choice index, usage from the
last chunk that carries one (vLLM repeats a running total on every chunk: never summed).
"""

from __future__ import annotations

from typing import Any

import orjson

from .chat_json import apply_choice, apply_meta, choice_state
from .fields import error_text, member
from .record import ChoiceRecord, CompletionRecord
from .stream_bytes import chunk_may_matter, quiet_prefix
from .usage import apply_usage

STREAM_CUT_OFF = "stream ended before the completion finished (no finish_reason, no [DONE])"


def has_content(delta: Any) -> bool:
    if not isinstance(delta, dict):
        return False
    for key in ("content", "reasoning", "reasoning_content", "refusal"):
        value = delta.get(key)
        if isinstance(value, str) and value:
            return True
    return bool(delta.get("tool_calls") or delta.get("audio") or delta.get("function_call"))


def has_text(choice: dict[str, Any]) -> bool:
    """A legacy completion chunk's choice with text in it."""
    text = choice.get("text")
    return isinstance(text, str) and bool(text)


class StreamFolder:
    """Folds streamed chunks (SSE data payloads) into one record.

    roles=False: legacy text completions, whose choices have no role; the fold settles without them."""

    __slots__ = (
        "_by_index",
        "_expected_choices",
        "_roles",
        "content_seen",
        "data_events",
        "done",
        "failed",
        "parsed_events",
        "record",
        "settled",
        "usage",
    )

    def __init__(self, record: CompletionRecord, expected_choices: int = 1, roles: bool = True) -> None:
        self.record = record
        self._expected_choices = expected_choices
        self._roles = roles
        self.settled = False  # identity, first content and every choice's role known
        self._by_index: dict[int, ChoiceRecord] = {}
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.failed = False
        self.content_seen = False
        self.data_events = 0
        self.parsed_events = 0

    def feed(self, data: bytes, event: bytes = b"") -> tuple[bool, bool]:
        """Fold one data payload (the event name means nothing in a chat stream).
        Returns (carries_content, is_usage_only_chunk)."""
        if data.startswith(b"[DONE]"):
            self.done = True
            return False, False
        if self.done:
            return False, self._late_usage(data)
        self.data_events += 1
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False, False
        if not isinstance(obj, dict):
            return False, False
        self.parsed_events += 1
        if self.settled and self.plain_delta(obj):
            return False, False
        record = self.record
        apply_meta(record, obj)
        carries_content = False
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                state = choice_state(record, self._by_index, choice.get("index", 0))
                if state is None:
                    continue
                delta = choice.get("delta")
                error = apply_choice(state, choice, delta)
                if error:
                    self.failed = True
                    record.error = record.error or error
                if state.finish_reason == "error":
                    self.failed = True
                if not carries_content and (has_content(delta) if delta is not None else has_text(choice)):
                    carries_content = True
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            usage = member(obj.get("x_groq"), "usage")
        if isinstance(usage, dict):
            self.usage = usage
        error = error_text(obj.get("error"))
        if error:
            self.failed = True
            record.error = error
        if carries_content:
            self.content_seen = True
        if not self.settled:
            self.settled = (
                self.content_seen
                and record.completion_id is not None
                and len(self._by_index) >= self._expected_choices
                and (not self._roles or all(state.role is not None for state in self._by_index.values()))
            )
        usage_only = (
            isinstance(choices, list) and not choices and isinstance(obj.get("usage"), dict) and not error
        )
        return carries_content, usage_only

    def plain_delta(self, obj: dict[str, Any]) -> bool:
        """A chunk with nothing left to fold (content deltas of known choices): most of a long stream.
        Parsing it is cheap (orjson); this check is what spares the full fold."""
        if obj.get("usage") is not None or obj.get("error") is not None or "x_groq" in obj:
            return False
        choices = obj.get("choices")
        if type(choices) is not list or not choices:
            return False
        by_index = self._by_index
        for choice in choices:
            if (
                type(choice) is not dict
                or choice.get("finish_reason") is not None
                or choice.get("native_finish_reason") is not None
                or choice.get("error") is not None
                or choice.get("index", 0) not in by_index
            ):
                return False
        return True

    def quiet(self, blocks: bytes) -> bool:
        """Whole SSE blocks of a settled fold (LF only) that certainly change nothing: left unparsed."""
        return not chunk_may_matter(blocks)

    def quiet_prefix(self, data: bytes, keep: int) -> int:
        """How many leading bytes of the rest of a stream certainly change nothing (stream_bytes)."""
        return quiet_prefix(self, data, keep)

    def _late_usage(self, data: bytes) -> bool:
        """After [DONE] the completion is over; only a (misplaced) usage-only chunk still counts."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict) or obj.get("error"):
            return False
        choices, usage = obj.get("choices"), obj.get("usage")
        if not (isinstance(choices, list) and not choices and isinstance(usage, dict)):
            return False
        self.usage = usage
        return True

    def finish(self, at_eof: bool = False) -> None:
        """Apply the last usage seen (token columns stay NULL when none arrived).

        at_eof: the upstream ended the stream normally. If that happened before [DONE] while a choice
        still had no finish_reason, the completion was cut off: the record says so.
        """
        if self.usage is not None:
            apply_usage(self.record, self.usage)
        if at_eof and not self.done and any(c.finish_reason is None for c in self._by_index.values()):
            self.failed = True
            self.record.error = self.record.error or STREAM_CUT_OFF
