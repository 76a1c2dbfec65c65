"""A finished call's outcome (`ok`, `upstream_error`, `unparsed`, `timeout`, ...) and its error text."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .chat_json import parse_completion_body
from .decoders import BodyTap
from .fields import RAW_ERROR_CHARS
from .record import CompletionRecord
from .stream_tap import StreamTap

if TYPE_CHECKING:
    from .formats import WireFormat


def error_summary(status: int, body: bytes | None) -> str:
    """`HTTP 502: <the body's start>`; cut to its stored length only after credentials are scrubbed."""
    if body:
        text = " ".join(body[:RAW_ERROR_CHARS].decode("utf-8", "replace").split())
        if text:
            return f"HTTP {status}: {text}"
    return f"HTTP {status}"


def classify(
    record: CompletionRecord,
    failure: tuple[str, str] | None,
    stream_tap: StreamTap | None,
    body_tap: BodyTap | None,
    wire: WireFormat | None,
    started: float,
) -> None:
    """Set outcome and error (and parse a plain body) once the exchange is over. `wire`: the API the
    body is parsed as; None for a path only logged (all_paths), whose error bodies are still read."""
    status = record.status_code or 0
    body: bytes | None = None
    parsed = False
    if stream_tap is not None:
        if failure is not None:
            stream_tap.folder.finish()
        first = stream_tap.first_content_at or stream_tap.first_event_at
        if first is not None:
            record.ttft_ms = round((first - started) * 1000, 3)
        parsed = stream_tap.folder.parsed_events > 0
        failed = stream_tap.folder.failed
    elif body_tap is not None:
        body = body_tap.body()
        if body is not None and (wire is not None or status >= 400):
            parsed = (wire.parse_body if wire is not None else parse_completion_body)(record, body)
        failed = bool(record.error) or any(c.finish_reason == "error" for c in record.choices)
    else:
        failed = False
    if failure is not None and not (
        failure[0] == "client_disconnected" and stream_tap is not None and stream_tap.folder.done
    ):  # a client that hangs up right after [DONE] got everything: not a disconnect
        record.outcome, record.error = failure[0], record.error or failure[1]
        return
    if status >= 400 or (wire is not None and status >= 300):  # a redirect is no completion either
        record.outcome = "upstream_error"
        if not record.error:
            record.error = error_summary(status, body)
        return
    if wire is not None and 200 <= status < 300:
        if not parsed:
            record.outcome = "unparsed"
            reason = body_tap.failure if body_tap is not None else None
            record.error = record.error or reason or f"response could not be parsed as {wire.what}"
        elif failed:
            record.outcome = "upstream_error"
        else:
            record.outcome = "ok"
        return
    record.outcome = "ok"
