"""Anthropic Messages streams: `message_start` ... `message_stop` folded into one record.

`message_start` carries the message (id, model) and the input and cache usage; `message_delta` the stop
reason and cumulative counts (output_tokens, and on newer APIs the input and cache counts again). The
two usage objects are merged field by field, the later value winning: adding them would count the input
twice. An `error` event (`overloaded_error`, ...) can come mid-stream, after a 200.
"""

from __future__ import annotations

from typing import Any

from .event_fold import EventFolder
from .fields import error_text
from .messages import apply_message_meta, apply_stop_reason
from .usage import apply_messages_usage

MAX_USAGE_FIELDS = 64  # other fields merged at most; the ones the ledger reads always are
READ_FIELDS = frozenset(
    {
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation",
        "output_tokens_details",
        "service_tier",
        "cost",
        "is_byok",
        "cost_details",
    }
)


class MessagesFolder(EventFolder):
    """Folds an Anthropic Messages event stream."""

    MARKERS = (b'"message', b'"error"')  # message_start/_delta/_stop and the message key; the error event
    KEY_EVENTS = frozenset({b"message_start", b"message_delta", b"message_stop", b"error"})

    __slots__ = ("usage",)

    def __init__(self, record: Any) -> None:
        super().__init__(record)
        self.usage: dict[str, Any] | None = None

    def _merge_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        merged = self.usage if self.usage is not None else {}
        for key, value in usage.items():
            if value is not None and (key in merged or key in READ_FIELDS or len(merged) < MAX_USAGE_FIELDS):
                merged[key] = value
        self.usage = merged

    def _fold(self, obj: dict[str, Any]) -> bool:
        kind = obj.get("type")
        if kind == "content_block_delta":
            return True
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                apply_message_meta(self.record, message)
                self.the_choice()
                self._merge_usage(message.get("usage"))
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                apply_stop_reason(self.the_choice(), delta.get("stop_reason"))
            self._merge_usage(obj.get("usage"))
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.done = True
            self.fail(error_text(obj.get("error")) or "error event")
        return False

    def finish(self, at_eof: bool = False) -> None:
        if self.usage is not None:
            apply_messages_usage(self.record, self.usage)
        super().finish(at_eof)
