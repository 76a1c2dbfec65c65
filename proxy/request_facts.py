"""What the proxy reads from a client's request: model, stream flag, user, key fingerprint, tags.

Pure code. The only change ever made to a request body is adding `stream_options.include_usage` to a
streaming request that lacks it (so the ledger gets token counts); that is done by splicing bytes, so
the rest of the client's body stays exactly as sent.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_plus

import orjson

from .completions import clean_text

MAX_TAGS = 16
MAX_TAG_CHARS = 128
MAX_USER_CHARS = 256
_INCLUDE_USAGE = b'"stream_options":{"include_usage":true}'


@dataclass(slots=True)
class RequestFacts:
    model: str | None = None
    stream: bool = False
    user: str | None = None
    wants_usage: bool = False
    usage_injected: bool = False
    choices: int = 1
    body: bytes = b""


def inspect_request(body: bytes, inject_usage: bool) -> RequestFacts:
    """Read a chat request body; with inject_usage, ask a streaming upstream for a usage chunk."""
    facts = RequestFacts(body=body)
    if not body:
        return facts
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return facts
    if not isinstance(obj, dict):
        return facts
    model = obj.get("model")
    if isinstance(model, str) and model:
        facts.model = clean_text(model)[:MAX_USER_CHARS] or None
    facts.stream = obj.get("stream") is True
    n = obj.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128:
        facts.choices = n
    user = obj.get("user")
    if isinstance(user, str) and user:
        facts.user = clean_text(user)[:MAX_USER_CHARS] or None
    stream_options = obj.get("stream_options")
    usage_option = obj.get("usage")
    asked_in_stream_options = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    asked_openrouter_style = isinstance(usage_option, dict) and usage_option.get("include") is True
    facts.wants_usage = asked_in_stream_options or asked_openrouter_style
    if inject_usage and facts.stream and not facts.wants_usage:
        if "stream_options" not in obj:
            facts.body = _splice_before_closing_brace(body)
            facts.usage_injected = True
        elif stream_options is None or isinstance(stream_options, dict):
            obj["stream_options"] = {**(stream_options or {}), "include_usage": True}
            facts.body = orjson.dumps(obj)
            facts.usage_injected = True
    return facts


def _splice_before_closing_brace(body: bytes) -> bytes:
    end = body.rstrip().rfind(b"}")
    head = body[:end].rstrip()
    separator = b"" if head.endswith(b"{") else b","
    return head + separator + _INCLUDE_USAGE + body[end:]


def header_user(value: str | None) -> str | None:
    """The `X-Ledger-User` header as a user, held to the same limits as the body's `user`."""
    if not value:
        return None
    return clean_text(value.strip())[:MAX_USER_CHARS] or None


def new_request_id() -> str:
    """A UUIDv7 (RFC 9562): millisecond time first, then 74 random bits. Time-ordered ids are appended
    at the end of the unique index instead of landing at random places in it, which keeps inserts into
    a large ledger fast, and they sort in arrival order. Built from hex digits, with the time part
    formatted once per millisecond: integer arithmetic costs more than twice as much, on every call."""
    global _stamp
    millisecond = time.time_ns() // 1_000_000
    if millisecond != _stamp[0]:
        hex_time = f"{millisecond & MASK_48:012x}"
        _stamp = (millisecond, f"{hex_time[:8]}-{hex_time[8:]}-7")  # 7: the version
    digits = _random_hex(19)
    # the RFC variant: the two high bits of the 17th digit are 10 (8, 9, a or b)
    return f"{_stamp[1]}{digits[:3]}-{VARIANT_DIGIT[digits[3]]}{digits[4:7]}-{digits[7:]}"


_stamp = (-1, "")  # (millisecond, the id's first 15 characters in it)
MASK_48 = (1 << 48) - 1
VARIANT_DIGIT = dict(zip("0123456789abcdef", "89ab89ab89ab89ab", strict=True))
_POOL_BYTES = 4096
_hex_pool = ""
_hex_at = 0


def _random_hex(count: int) -> str:
    """Random hex digits from os.urandom, read 4 KiB at a time: one getrandom() per ~430 ids."""
    global _hex_pool, _hex_at
    start = _hex_at
    if start + count > len(_hex_pool):
        _hex_pool, start = os.urandom(_POOL_BYTES).hex(), 0
    _hex_at = start + count
    return _hex_pool[start : start + count]


def _forget_random_pool() -> None:
    """A forked child must not hand out the digits its parent has already used."""
    global _hex_pool, _hex_at
    _hex_pool, _hex_at = "", 0


os.register_at_fork(after_in_child=_forget_random_pool)


SECRET_QUERY_PARAMETERS = frozenset({"key", "api_key", "api-key", "apikey", "access_token", "token", "code"})


def redact_query(target: str) -> str:
    """The request target as logged: values of key-like query parameters (`?key=...`, as Gemini's
    OpenAI-compatible endpoint takes) become `[redacted]`, so no key reaches the database."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    parts = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        if equals and unquote_plus(name).lower() in SECRET_QUERY_PARAMETERS:
            part = f"{name}=[redacted]"
        parts.append(part)
    return f"{path}?{'&'.join(parts)}"


@lru_cache(maxsize=4096)
def key_fingerprint(api_key: str) -> str:
    """First 16 hex characters of the key's SHA-256: enough to tell keys apart, useless to an attacker."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def bearer_key(headers: Any) -> str | None:
    """The client's API key: `Authorization: Bearer`, Azure's `api-key` or Anthropic's `x-api-key`."""
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
    for name in ("api-key", "x-api-key"):
        value = headers.get(name)
        if value and value.strip():
            return value.strip()
    return None


def parse_tags(values: list[str]) -> dict[str, str] | None:
    """`X-Ledger-Tags: k=v,k2=v2` (several headers merge).

    At most 16 pairs; a pair over 128 characters is dropped, and a repeated key keeps its last value.
    """
    tags: dict[str, str] = {}
    for value in values:
        for pair in value.split(","):
            pair = pair.strip()
            if not pair or len(pair) > MAX_TAG_CHARS:
                continue
            key, _, tag_value = pair.partition("=")
            key = key.strip()
            if not key:
                continue
            if key not in tags and len(tags) >= MAX_TAGS:
                continue
            tags[key] = tag_value.strip()
    return tags or None
