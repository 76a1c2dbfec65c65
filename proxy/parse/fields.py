"""Reading values out of parsed JSON: every wire format's parser takes its fields through these.

Nothing here raises on bad input: a value of the wrong type reads as None (NULL in the ledger), never as
a guess, and never as 0 for unknown.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

MAX_TOKEN_COUNT = 2**62
MAX_ERROR_CHARS = 1000  # as stored; parse.capture.finish_error cuts it there, after scrubbing credentials
RAW_ERROR_CHARS = MAX_ERROR_CHARS + 4096  # what parsing keeps: room for a key that straddles the cut
MAX_TEXT_CHARS = 1000


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


def as_text(value: Any) -> str | None:
    """A non-empty string, or None (Azure's first chunk sends empty strings for unknown values)."""
    if isinstance(value, str) and value:
        if len(value) <= MAX_TEXT_CHARS and value.isascii() and "\x00" not in value:
            return value  # the usual id or model name: nothing to clean or cut
        return clean_text(value)[:MAX_TEXT_CHARS] or None
    return None


def as_count(value: Any) -> int | None:
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


def as_amount(value: Any) -> Decimal | None:
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


def first_count(*values: Any) -> int | None:
    for value in values:
        count = as_count(value)
        if count is not None:
            return count
    return None


def detail_count(usage: dict[str, Any], details: tuple[str, ...], key: str) -> int | None:
    """`key` from the first of the usage's detail objects that has it as a count."""
    for name in details:
        detail = usage.get(name)
        if isinstance(detail, dict):
            count = as_count(detail.get(key))
            if count is not None:
                return count
    return None


def member(obj: Any, key: str) -> Any:
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
    message = clean_text(message[:RAW_ERROR_CHARS]).strip()
    return message or None


