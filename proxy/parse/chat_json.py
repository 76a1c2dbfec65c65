"""Chat completions as a JSON body (`POST .../chat/completions` without streaming), legacy text
completions (`POST .../completions`, the same shape with `text` for `message`), and the field rules the
stream fold (chat_stream.py) shares: identity fields from the first object that has them, choices keyed
by index, usage from `usage` or Groq's `x_groq.usage`.
"""

from __future__ import annotations

from typing import Any

import orjson

from .fields import as_count, as_text, error_text, member
from .record import ChoiceRecord, CompletionRecord
from .usage import apply_usage

MAX_CHOICES = 128  # OpenAI's limit for n
MAX_CHOICE_INDEX = 2**31 - 1


def apply_meta(record: CompletionRecord, obj: dict[str, Any]) -> None:
    """Identity fields, each from the first object that has a usable value."""
    get = obj.get
    if record.completion_id is None:
        record.completion_id = as_text(get("id"))
    if record.created is None:
        record.created = as_count(get("created")) or None
    # spelled out, not a loop over the names with getattr/setattr: this runs for every logged call
    if record.object is None:
        record.object = as_text(get("object"))
    if record.model is None:
        record.model = as_text(get("model"))
    if record.provider is None:
        record.provider = as_text(get("provider"))
    if record.system_fingerprint is None:
        record.system_fingerprint = as_text(get("system_fingerprint"))
    if record.service_tier is None:
        record.service_tier = as_text(get("service_tier"))


def choice_state(
    record: CompletionRecord, by_index: dict[int, ChoiceRecord], index: Any
) -> ChoiceRecord | None:
    position = as_count(index)
    if position is None or position > MAX_CHOICE_INDEX:  # the column is a 32-bit INTEGER
        return None
    state = by_index.get(position)
    if state is None:
        if len(by_index) >= MAX_CHOICES:  # a hostile stream could name a new index in every chunk
            return None
        state = by_index[position] = ChoiceRecord(position)
        record.choices.append(state)
    return state


def apply_choice(state: ChoiceRecord, choice: dict[str, Any], message: Any) -> str | None:
    """Fold one choice (or choice delta) into its state; returns the choice's error message if any."""
    finish = as_text(choice.get("finish_reason"))
    if finish is not None:
        state.finish_reason = finish
    native = as_text(choice.get("native_finish_reason"))
    if native is not None:
        state.native_finish_reason = native
    if state.role is None:
        state.role = as_text(member(message, "role"))
    return error_text(choice.get("error"))


COMPLETION_OBJECTS = frozenset({"chat.completion", "text_completion"})


def is_completion(obj: dict[str, Any]) -> bool:
    """Whether a JSON object looks like a completion (a 200 can carry anything, e.g. a gateway's notice)."""
    return (
        isinstance(obj.get("choices"), list)
        or isinstance(obj.get("usage"), dict)
        or isinstance(member(obj.get("x_groq"), "usage"), dict)
        or as_text(obj.get("object")) in COMPLETION_OBJECTS
    )


def parse_completion_body(record: CompletionRecord, body: bytes) -> bool:
    """Fill the record from a non-streaming JSON response.

    Returns False (record untouched) when the body is neither a completion nor an error envelope.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(obj, dict):
        return False
    error = error_text(obj.get("error"))
    if not is_completion(obj):
        if error:
            record.error = error
        return error is not None
    apply_meta(record, obj)
    by_index: dict[int, ChoiceRecord] = {}
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                state = choice_state(record, by_index, choice.get("index", len(by_index)))
                if state is not None:
                    error = apply_choice(state, choice, choice.get("message"))
                    if error and record.error is None:
                        record.error = error
    usage = obj.get("usage")
    if isinstance(usage, dict):
        apply_usage(record, usage)
    else:
        groq_usage = member(obj.get("x_groq"), "usage")
        if isinstance(groq_usage, dict):
            apply_usage(record, groq_usage)
    if error:
        record.error = error
    return True
