"""OpenAI Responses API streams: `response.created` ... `response.completed` (or `.incomplete`,
`.failed`, or an `error` event) folded into one record.

Every `response.*` lifecycle event carries the whole Response; the terminal one has its status, output
and usage (null before). Content deltas (`response.output_text.delta`, ...) only time the first token.
No `[DONE]`: the terminal event ends the stream.
"""

from __future__ import annotations

from typing import Any

from .event_fold import EventFolder
from .fields import error_text
from .responses import apply_response

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
LIFECYCLE = frozenset({"response.created", "response.in_progress", "response.queued"})


class ResponsesFolder(EventFolder):
    """Folds a Responses API event stream. Only lifecycle, terminal and error events change the record."""

    MARKERS = (b'"response"', b'"error"')  # the Response object's key; the error event's type
    KEY_EVENTS = frozenset({*(name.encode() for name in TERMINAL | LIFECYCLE), b"error"})

    __slots__ = ()

    def _fold(self, obj: dict[str, Any]) -> bool:
        kind = obj.get("type")
        if not isinstance(kind, str):
            return False
        if kind.endswith(".delta"):
            return True
        record = self.record
        if kind in TERMINAL or kind in LIFECYCLE:
            response = obj.get("response")
            if isinstance(response, dict):
                final = kind in TERMINAL
                apply_response(record, response, self.the_choice() if final else None)
                if final:
                    self.done = True
                    if kind == "response.failed":
                        self.fail(record.error or "response failed")
        elif kind == "error":
            # the event is the error object itself: {"type":"error","code":...,"message":...}
            self.done = True
            self.fail(error_text(obj.get("message")) or error_text(obj.get("error")) or "error event")
        return False
