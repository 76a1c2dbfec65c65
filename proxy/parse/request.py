"""What a client's request tells the ledger: model, stream flag, user, tags.

Pure code. The only change ever made to a request body is adding `stream_options.include_usage` to a
streaming request that lacks it (so the ledger gets token counts); that is done by splicing bytes, so
the rest of the client's body stays exactly as sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from .fields import clean_text

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
    """Read a request body (any parsed API); with inject_usage, ask a streaming upstream for a usage chunk."""
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
    if not isinstance(user, str):  # Anthropic Messages: metadata.user_id
        metadata = obj.get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
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
