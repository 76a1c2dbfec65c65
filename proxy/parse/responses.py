"""OpenAI Responses API (`POST .../responses`) as a JSON body, and the Response object rules its stream
fold (responses_stream.py) shares.

completion_id is the response id (`resp_...`), `created` its `created_at`. The status becomes the one
choice's finish reason in the chat vocabulary, the native value kept beside it: completed -> stop
(tool_calls when the output holds calls the client must run), incomplete -> length (max_output_tokens)
or content_filter, failed -> error. Usage keeps OpenAI's names (input_tokens counts cached ones).
"""

from __future__ import annotations

from typing import Any

import orjson

from .chat_json import apply_meta
from .fields import as_count, as_text, error_text, member
from .record import ChoiceRecord, CompletionRecord
from .usage import apply_usage

# output items that ask the client to act: the response ended to have them run
TOOL_CALL_ITEMS = frozenset(
    {"function_call", "custom_tool_call", "computer_call", "local_shell_call", "shell_call", "apply_patch_call"}
)
INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}
UNFINISHED = frozenset({"queued", "in_progress"})  # a background response, answered before it ran


def finish_reasons(response: dict[str, Any]) -> tuple[str | None, str | None]:
    """(finish_reason, native_finish_reason) of a Response. An unknown status passes through as both."""
    status = as_text(response.get("status"))
    if status is None or status in UNFINISHED:
        return None, status
    if status == "completed":
        output = response.get("output")
        calls = isinstance(output, list) and any(member(item, "type") in TOOL_CALL_ITEMS for item in output)
        return ("tool_calls" if calls else "stop"), status
    if status == "incomplete":
        reason = as_text(member(response.get("incomplete_details"), "reason"))
        return INCOMPLETE_REASONS.get(reason or "", reason or status), reason or status
    if status == "failed":
        return "error", status
    return status, status


def apply_response(record: CompletionRecord, response: dict[str, Any], choice: ChoiceRecord | None) -> None:
    """Identity fields from a Response object; with `choice`, also its status, usage and error (a
    finished Response: the JSON body, or a stream's terminal event)."""
    if record.created is None:
        record.created = as_count(response.get("created_at")) or None
    apply_meta(record, response)
    if choice is None:
        return
    choice.finish_reason, choice.native_finish_reason = finish_reasons(response)
    usage = response.get("usage")
    if isinstance(usage, dict):
        apply_usage(record, usage)
    if choice.finish_reason == "error":
        record.error = error_text(response.get("error")) or "response failed"


def parse_response_body(record: CompletionRecord, body: bytes) -> bool:
    """Fill the record from a Response JSON body (or an error envelope). False: neither."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(obj, dict):
        return False
    if obj.get("object") != "response" and "output" not in obj and not isinstance(obj.get("usage"), dict):
        error = error_text(obj.get("error"))
        if error:
            record.error = error
        return error is not None
    choice = ChoiceRecord(0, role="assistant")
    record.choices.append(choice)
    apply_response(record, obj, choice)
    return True
