"""The client's credentials: found in a request, fingerprinted, and kept out of everything logged.

The key itself never leaves the serving process. The ledger stores a fingerprint (the first 16 hex
characters of its SHA-256), and text that may echo a key (an upstream's error message) is scrubbed
either with the key in hand (request path) or with only its fingerprint and length (the writer).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_plus

_KEY_RUN = re.compile(r"[^\s\"'`,;:()\[\]{}<>]+")  # a key never spans whitespace, quotes or JSON punctuation


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




def redact_fingerprinted(text: str, fingerprint: str, key_length: int) -> str:
    """Replace the client's key in text, knowing only its fingerprint and length: every substring of
    that length inside a run of key characters is hashed and compared. Runs only on error text."""
    if key_length <= 0:
        return text
    found: list[str] = []
    for match in _KEY_RUN.finditer(text):
        run = match.group()
        for start in range(len(run) - key_length + 1):
            candidate = run[start : start + key_length]
            digest = hashlib.sha256(candidate.encode("utf-8", "surrogateescape")).hexdigest()[:16]
            if digest == fingerprint:
                found.append(candidate)
    for key in found:
        text = text.replace(key, "[redacted]")
    return text
