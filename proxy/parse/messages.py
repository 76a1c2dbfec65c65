"""Anthropic Messages (`POST .../v1/messages`, and gateways' Anthropic-compatible endpoints such as
OpenRouter's `/api/v1/messages`) as a JSON body, and the rules its stream fold (messages_stream.py)
shares.

The stop reason becomes the one choice's finish reason in the chat vocabulary, the native value kept
beside it. Usage follows OpenAI's convention (usage.apply_messages_usage): prompt_tokens counts cache
reads and writes too.
"""

from __future__ import annotations

from typing import Any

import orjson

from .chat_json import apply_meta
from .fields import as_text, error_text, member
from .record import ChoiceRecord, CompletionRecord
from .usage import apply_messages_usage

# pause_turn: a long server-tool turn handed back to be continued, not cut short; unknown values pass through
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def apply_stop_reason(choice: ChoiceRecord, value: Any) -> None:
    native = as_text(value)
    if native is not None:
        choice.finish_reason = STOP_REASONS.get(native, native)
        choice.native_finish_reason = native


def apply_message_meta(record: CompletionRecord, message: dict[str, Any]) -> None:
    """id, model, `type` as the object, and the service tier Anthropic reports inside usage."""
    if record.object is None:
        record.object = as_text(message.get("type"))
    apply_meta(record, message)
    if record.service_tier is None:
        record.service_tier = as_text(member(message.get("usage"), "service_tier"))


def parse_message_body(record: CompletionRecord, body: bytes) -> bool:
    """Fill the record from a Message JSON body (or an error envelope). False: neither."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(obj, dict):
        return False
    if obj.get("type") != "message":
        error = error_text(obj.get("error"))  # {"type":"error","error":{"type":...,"message":...}}
        if error:
            record.error = error
        return error is not None
    apply_message_meta(record, obj)
    choice = ChoiceRecord(0, role=as_text(obj.get("role")) or "assistant")
    record.choices.append(choice)
    apply_stop_reason(choice, obj.get("stop_reason"))
    usage = obj.get("usage")
    if isinstance(usage, dict):
        apply_messages_usage(record, usage)
    return True
