"""Pure parsing of chat completions: a JSON body or a stream of SSE chunks becomes one CompletionRecord.

No I/O, no aiohttp, no SQLAlchemy. Nothing here raises on bad input: a field with the wrong type is
left empty (NULL), never guessed, and never 0 for unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

MAX_TOKEN_COUNT = 2**62
MAX_ERROR_CHARS = 1000
MAX_TEXT_CHARS = 1000
MAX_USAGE_JSON_BYTES = 64 * 1024
MAX_CHOICES = 128  # OpenAI's limit for n
MAX_CHOICE_INDEX = 2**31 - 1


@dataclass(slots=True)
class ChoiceRecord:
    index: int
    finish_reason: str | None = None
    native_finish_reason: str | None = None
    role: str | None = None


@dataclass(slots=True)
class CompletionRecord:
    """Everything logged about one proxied call; its fields are the `completions` columns."""

    request_id: str
    started_at: datetime
    method: str
    path: str
    upstream: str
    duration_ms: float | None = None
    ttft_ms: float | None = None
    status_code: int | None = None
    outcome: str = "ok"
    stream: bool = False
    requested_model: str | None = None
    completion_id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None
    provider: str | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost: Decimal | None = None
    cost_source: str | None = None
    usage: dict[str, Any] | None = None
    api_key_hash: str | None = None
    user: str | None = None
    tags: dict[str, str] | None = None
    error: str | None = None
    upstream_request_id: str | None = None
    choices: list[ChoiceRecord] = field(default_factory=list)


def clean_text(value: str) -> str:
    """Text every database and the spool accept: no NUL (PostgreSQL refuses it in text columns), no lone
    surrogates (undecodable header bytes become U+FFFD)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:
                value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            except UnicodeEncodeError:
                value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "") if "\x00" in value else value


def _text(value: Any) -> str | None:
    """A non-empty string, or None (Azure's first chunk sends empty strings for unknown values)."""
    if isinstance(value, str) and value:
        if len(value) <= MAX_TEXT_CHARS and value.isascii() and "\x00" not in value:
            return value  # the usual id or model name: nothing to clean or cut
        return clean_text(value)[:MAX_TEXT_CHARS] or None
    return None


def _count(value: Any) -> int | None:
    """A token count: a non-negative integer (floats like 12.0 accepted), else None."""
    if type(value) is int:  # the usual case first; bool is not int here
        return value if 0 <= value < MAX_TOKEN_COUNT else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < MAX_TOKEN_COUNT else None
    if isinstance(value, float) and value.is_integer() and 0 <= value < MAX_TOKEN_COUNT:
        return int(value)
    return None


_AMOUNT_TYPES = (int, float, str)
_MAX_AMOUNT = Decimal(10) ** 12


def _cost(value: Any) -> Decimal | None:
    """A non-negative finite amount from a number or a numeric string."""
    if value is None or isinstance(value, bool) or not isinstance(value, _AMOUNT_TYPES):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0 or amount >= _MAX_AMOUNT:
        return None
    return amount


def _first_count(*values: Any) -> int | None:
    for value in values:
        count = _count(value)
        if count is not None:
            return count
    return None


def _detail_count(usage: dict[str, Any], details: tuple[str, ...], key: str) -> int | None:
    """`key` from the first of the usage's detail objects that has it as a count."""
    for name in details:
        detail = usage.get(name)
        if isinstance(detail, dict):
            count = _count(detail.get(key))
            if count is not None:
                return count
    return None


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


def error_text(value: Any) -> str | None:
    """The message of an error object or string, cut to a sensible length."""
    if isinstance(value, str):
        message = value
    elif isinstance(value, dict):
        message = value.get("message")
        if not isinstance(message, str) or not message:
            try:
                message = orjson.dumps(value).decode()
            except TypeError:
                message = "error"
    elif value is None or value is False:
        return None
    else:
        message = str(value)
    message = clean_text(message).strip()
    return message[:MAX_ERROR_CHARS] if message else None


_PROMPT_DETAILS = ("prompt_tokens_details", "input_tokens_details")
_COMPLETION_DETAILS = ("completion_tokens_details", "output_tokens_details")


def apply_usage(record: CompletionRecord, usage: dict[str, Any]) -> None:
    """Map a usage object (OpenAI, OpenRouter, Responses API, DeepSeek, Anthropic-style) to columns."""
    # each field from the first source that has it as a count; later sources are looked up only if needed
    get = usage.get
    prompt = _count(get("prompt_tokens"))
    if prompt is None:
        prompt = _count(get("input_tokens"))
    completion = _count(get("completion_tokens"))
    if completion is None:
        completion = _count(get("output_tokens"))
    total = _count(get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    record.prompt_tokens, record.completion_tokens, record.total_tokens = prompt, completion, total
    cached = _detail_count(usage, _PROMPT_DETAILS, "cached_tokens")
    if cached is None:
        cached = _first_count(get("prompt_cache_hit_tokens"), get("cache_read_input_tokens"))
    record.cached_tokens = cached
    cache_write = _detail_count(usage, _PROMPT_DETAILS, "cache_write_tokens")
    if cache_write is None:
        cache_write = _count(get("cache_creation_input_tokens"))
    record.cache_write_tokens = cache_write
    record.reasoning_tokens = _detail_count(usage, _COMPLETION_DETAILS, "reasoning_tokens")
    cost = _cost(usage.get("cost"))
    record.cost = cost
    record.cost_source = "upstream" if cost is not None else None
    try:
        small_enough = len(orjson.dumps(usage)) <= MAX_USAGE_JSON_BYTES
    except TypeError:
        small_enough = False
    record.usage = usage if small_enough else {"truncated": True}


def _apply_meta(record: CompletionRecord, obj: dict[str, Any]) -> None:
    """Identity fields, each from the first object that has a usable value."""
    get = obj.get
    if record.completion_id is None:
        record.completion_id = _text(get("id"))
    if record.created is None:
        record.created = _count(get("created")) or None
    # spelled out, not a loop over the names with getattr/setattr: this runs for every logged call
    if record.object is None:
        record.object = _text(get("object"))
    if record.model is None:
        record.model = _text(get("model"))
    if record.provider is None:
        record.provider = _text(get("provider"))
    if record.system_fingerprint is None:
        record.system_fingerprint = _text(get("system_fingerprint"))
    if record.service_tier is None:
        record.service_tier = _text(get("service_tier"))


def _choice_state(
    record: CompletionRecord, by_index: dict[int, ChoiceRecord], index: Any
) -> ChoiceRecord | None:
    position = _count(index)
    if position is None or position > MAX_CHOICE_INDEX:  # the column is a 32-bit INTEGER
        return None
    state = by_index.get(position)
    if state is None:
        if len(by_index) >= MAX_CHOICES:  # a hostile stream could name a new index in every chunk
            return None
        state = by_index[position] = ChoiceRecord(position)
        record.choices.append(state)
    return state


def _apply_choice(state: ChoiceRecord, choice: dict[str, Any], message: Any) -> str | None:
    """Fold one choice (or choice delta) into its state; returns the choice's error message if any."""
    finish = _text(choice.get("finish_reason"))
    if finish is not None:
        state.finish_reason = finish
    native = _text(choice.get("native_finish_reason"))
    if native is not None:
        state.native_finish_reason = native
    if state.role is None:
        state.role = _text(_get(message, "role"))
    return error_text(choice.get("error"))


COMPLETION_OBJECTS = frozenset({"chat.completion", "response", "text_completion"})


def _is_completion(obj: dict[str, Any]) -> bool:
    """Whether a JSON object looks like a completion (a 200 can carry anything, e.g. a gateway's notice)."""
    return (
        isinstance(obj.get("choices"), list)
        or isinstance(obj.get("usage"), dict)
        or isinstance(_get(obj.get("x_groq"), "usage"), dict)
        or _text(obj.get("object")) in COMPLETION_OBJECTS
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
    response = obj.get("response")
    if isinstance(response, dict) and "output" in response:  # Responses API wrapper
        obj = response
    error = error_text(obj.get("error"))
    if not _is_completion(obj):
        if error:
            record.error = error
        return error is not None
    _apply_meta(record, obj)
    by_index: dict[int, ChoiceRecord] = {}
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                state = _choice_state(record, by_index, choice.get("index", len(by_index)))
                if state is not None:
                    error = _apply_choice(state, choice, choice.get("message"))
                    if error and record.error is None:
                        record.error = error
    usage = obj.get("usage")
    if isinstance(usage, dict):
        apply_usage(record, usage)
    else:
        groq_usage = _get(obj.get("x_groq"), "usage")
        if isinstance(groq_usage, dict):
            apply_usage(record, groq_usage)
    if error:
        record.error = error
    return True


def _has_content(delta: Any) -> bool:
    if not isinstance(delta, dict):
        return False
    for key in ("content", "reasoning", "reasoning_content", "refusal"):
        value = delta.get(key)
        if isinstance(value, str) and value:
            return True
    return bool(delta.get("tool_calls") or delta.get("audio") or delta.get("function_call"))


STREAM_CUT_OFF = "stream ended before the completion finished (no finish_reason, no [DONE])"


_ALWAYS_PARSE = (b'"error"', b"x_groq", b"[DONE]", b'"response"')


def chunk_may_matter(data: bytes) -> bool:
    """False only for stream bytes that certainly carry no finish reason, usage, error or [DONE].

    A byte search, far cheaper than parsing: once a stream's identity and first content are known,
    the content deltas in between need no parsing. Unusual spacing only makes this answer True.
    """
    for marker in _ALWAYS_PARSE:
        if marker in data:
            return True
    finish = data.count(b'finish_reason"')
    if finish and finish != data.count(b'finish_reason":null') + data.count(b'finish_reason": null'):
        return True
    usage = data.count(b'"usage"')
    return bool(usage) and usage != data.count(b'"usage":null') + data.count(b'"usage": null')


_EMPTY_ARRAY_OPENING = re.compile(rb"\[[\]\s]")  # one regex pass: four 2-byte finds cost three times more


may_hold_empty_array = _EMPTY_ARRAY_OPENING.search  # truthy when the bytes may hold `"choices":[]`


def first_empty_array(data: bytes) -> int:
    """Where the first possible empty JSON array starts, or -1: bytes before it hold no `"choices":[]`
    chunk (the usage-only chunk), whatever else they hold."""
    match = _EMPTY_ARRAY_OPENING.search(data)
    return match.start() if match else -1


def _content_template(payload: bytes) -> tuple[bytes, bytes] | None:
    """(the bytes before a chunk's content string's value, the bytes after it), for a chunk with no
    backslash, newline or CR (so the first quote after the opening one closes the string)."""
    start = payload.find(b'"content":"')
    if start < 0 or b"\\" in payload or b"\n" in payload or b"\r" in payload:
        return None
    start += len(b'"content":"')
    end = payload.find(b'"', start)
    return (payload[:start], payload[end:]) if end >= 0 else None


# OpenAI adds `"obfuscation":"<random padding>"` to every chunk. The folder never reads it, so for the shape
# proof the values are emptied first: in valid JSON without a backslash the pattern matches only that key and
# its whole string value, and a block that is not valid JSON changes nothing when parsed either.
_OBFUSCATED = b'"obfuscation":"'
_OBFUSCATION = re.compile(rb'"obfuscation":"[^"\n]*"')


class StreamFolder:
    """Folds streamed chunks (SSE data payloads) into one record.

    Identity fields come from the first chunk that has them, finish reasons per choice index, usage
    from the last chunk that carries one (vLLM repeats a running total on every chunk: never summed).
    """

    __slots__ = (
        "_by_index",
        "_expected_choices",
        "content_seen",
        "data_events",
        "done",
        "failed",
        "parsed_events",
        "record",
        "settled",
        "usage",
    )

    def __init__(self, record: CompletionRecord, expected_choices: int = 1) -> None:
        self.record = record
        self._expected_choices = expected_choices
        self.settled = False  # identity, first content and every choice's role known
        self._by_index: dict[int, ChoiceRecord] = {}
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.failed = False
        self.content_seen = False
        self.data_events = 0
        self.parsed_events = 0

    def feed(self, data: bytes) -> tuple[bool, bool]:
        """Fold one data payload. Returns (carries_content, is_usage_only_chunk)."""
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
        if self.settled and self._plain_delta(obj):
            return False, False
        record = self.record
        response = obj.get("response")
        if isinstance(response, dict):  # Responses API events carry the response object
            _apply_meta(record, response)
            usage = response.get("usage")
            if isinstance(usage, dict):
                self.usage = usage
            if obj.get("type") == "response.failed":
                self.failed = True
                record.error = record.error or error_text(response.get("error")) or "response failed"
            return False, False
        _apply_meta(record, obj)
        carries_content = False
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                state = _choice_state(record, self._by_index, choice.get("index", 0))
                if state is None:
                    continue
                delta = choice.get("delta")
                error = _apply_choice(state, choice, delta)
                if error:
                    self.failed = True
                    record.error = record.error or error
                if state.finish_reason == "error":
                    self.failed = True
                if not carries_content and _has_content(delta):
                    carries_content = True
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            usage = _get(obj.get("x_groq"), "usage")
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
                and all(state.role is not None for state in self._by_index.values())
            )
        usage_only = (
            isinstance(choices, list) and not choices and isinstance(obj.get("usage"), dict) and not error
        )
        return carries_content, usage_only

    def _plain_delta(self, obj: dict[str, Any]) -> bool:
        """A chunk with nothing left to fold (content deltas of known choices): most of a long stream.
        Parsing it is cheap (orjson); this check is what spares the full fold."""
        if obj.get("usage") is not None or obj.get("error") is not None or "x_groq" in obj or "response" in obj:
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

    def quiet_prefix(self, data: bytes, keep: int) -> int:
        """How many leading bytes of `data` (whole SSE blocks, at a block boundary) certainly change
        nothing in a settled fold: what is left must be parsed.

        All but the last `keep` bytes, if skippable proves them quiet; for the usual long stream of
        same-shape deltas, more: up to the last joint between two such blocks (what follows is the
        finish, the usage and [DONE]). (OpenAI's blocks, with a random `obfuscation` string in each,
        rarely share a joint: skippable proves them after emptying those strings.)"""
        if not self.settled:
            return 0
        cut = data.rfind(b"\n\n", 0, len(data) - keep) + 2
        first = data.find(b"\n\n")
        template = _content_template(data[6:first]) if data.startswith(b"data: ") and first > 6 else None
        if template is not None:
            tail = template[1] + b"\n\n"
            joint = data.rfind(tail + b"data: " + template[0], max(cut, 0)) + len(tail)  # the last few KB
            if joint > cut and self._same_shape(data[:joint]):
                return joint
        return cut if cut >= 2 and self.skippable(data[:cut]) else 0

    def skippable(self, blocks: bytes) -> bool:
        """True when whole SSE blocks certainly change nothing in a settled fold: the fast proof of
        _same_shape when it applies, chunk_may_matter's marker search otherwise. Never with a CR: the
        caller skips by byte count, which needs LF-only blocks."""
        if not self.settled or b"\r" in blocks:
            return False
        same = self._same_shape(blocks)
        if same is None and b"\\" not in blocks and _OBFUSCATED in blocks[: blocks.find(b"\n\n")]:
            same = self._same_shape(_OBFUSCATION.sub(_OBFUSCATED + b'"', blocks))
        return (not chunk_may_matter(blocks)) if same is None else same

    def _same_shape(self, blocks: bytes) -> bool | None:
        """For the usual long stream: every block is `data: ` + the first block's JSON with only its
        content string changed. Counting the joints between blocks, the quotes and the newlines proves
        it in a few byte searches: when the quotes and newlines are all in the joints, no content
        string hides a quote (none has a backslash to escape one), and each block is one data line.
        Then the blocks change nothing if the first one changes nothing. None: not such blocks."""
        if b"\\" in blocks or b"\r" in blocks:
            return None
        first = blocks.find(b"\n\n")
        if not blocks.startswith(b"data: ") or first <= 6:
            return None
        payload = blocks[6:first]
        template = _content_template(payload)
        if template is None:
            return None
        head, tail = b"data: " + template[0], template[1] + b"\n\n"
        if not blocks.endswith(tail):
            return None
        joints = blocks.count(tail + head)
        quotes = head.count(b'"') + tail.count(b'"')
        newlines = len(blocks) - len(blocks.replace(b"\n", b""))  # 4x faster than count: newlines are few
        if newlines != 2 * (joints + 1) or blocks.count(b'"') != (joints + 1) * quotes:
            return None
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        return type(obj) is dict and self._plain_delta(obj)

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
