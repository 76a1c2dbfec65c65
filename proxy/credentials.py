"""The client's credentials: found in a request, fingerprinted, and kept out of everything logged.

No credential leaves the serving process. The ledger stores the fingerprint of the primary key (the
first 16 hex characters of its SHA-256); text that may echo any credential of the request (the path, an
upstream's error message) is scrubbed either with the credentials in hand (request path) or with only
their fingerprints and lengths (the writer).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_plus

_KEY_RUN = re.compile(r"[^\s\"'`,;:()\[\]{}<>]+")  # a key never spans whitespace, quotes or JSON punctuation


SECRET_QUERY_PARAMETERS = frozenset(
    {
        "key", "api_key", "api-key", "apikey", "x-api-key", "access_token", "refresh_token", "id_token", "token",
        "auth", "authorization", "password", "passwd", "pwd", "secret", "client_secret", "sig", "signature", "code",
        "session", "sessionid", "credential", "credentials",
    }
)  # fmt: skip
_SECRET_NAME_ENDINGS = ("key", "token", "secret", "password", "signature")
MIN_SECRET_CHARS = 6  # shorter values (`token=1`, `auth=true`) are not scrubbed from error text: too common
# in a header name, these mark a credential: Authorization, x-api-key, api-key, x-goog-api-key, Cookie ...
_SECRET_HEADER_MARKERS = ("auth", "key", "token", "secret", "cookie", "passw")


def is_secret_parameter(name: str) -> bool:
    """A query parameter whose value is a credential (`?key=`, `?access_token=`, `?x_api_key=` ...)."""
    name = name.lower()
    return name in SECRET_QUERY_PARAMETERS or name.endswith(_SECRET_NAME_ENDINGS)


def redact_query(target: str) -> str:
    """The request target as logged: values of credential-like query parameters (`?key=...`, as Gemini's
    OpenAI-compatible endpoint takes) become `[redacted]`, so no key reaches the database."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    parts = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        if equals and is_secret_parameter(unquote_plus(name)):
            part = f"{name}=[redacted]"
        parts.append(part)
    return f"{path}?{'&'.join(parts)}"


def request_secrets(headers: Any, target: str) -> tuple[str, ...]:
    """Every credential a request carries, as text an upstream could echo: the values of credential
    headers (an `Authorization` value also without its scheme, a Basic one also decoded, cookies one
    by one) and of credential-like query parameters (raw and decoded). Values shorter than
    MIN_SECRET_CHARS are left out."""
    found: list[str] = []
    names = "\n".join(headers.keys()).lower()  # one string searched per marker: a regex costs several times more
    for name in _secret_header_names(names):
        for value in headers.getall(name, ()):
            _header_secrets(name, value, found)
    _, mark, query = target.partition("?")
    if mark:
        for part in query.split("&"):
            name, equals, value = part.partition("=")
            if equals and value and is_secret_parameter(unquote_plus(name)):
                found.append(value)
                found.append(unquote_plus(value))
    if len(found) == 2 and found[1] != found[0] and len(found[1]) >= MIN_SECRET_CHARS:  # the usual `Bearer <key>`
        return (found[0], found[1])
    return tuple(value for value in dict.fromkeys(found) if len(value) >= MIN_SECRET_CHARS)


@lru_cache(maxsize=256)
def _secret_header_names(names: str) -> tuple[str, ...]:
    """The lines of `names` (header names, lowercased, one per line) that carry a credential marker.
    Cached: a client sends the same header names call after call."""
    found = set()
    for marker in _SECRET_HEADER_MARKERS:
        at = names.find(marker)
        while at >= 0:
            end = names.find("\n", at)
            end = len(names) if end < 0 else end
            found.add(names[names.rfind("\n", 0, at) + 1 : end])
            at = names.find(marker, end)
    return tuple(found)


def _header_secrets(name: str, value: str, found: list[str]) -> None:
    value = value.strip()
    found.append(value)
    if name == "cookie":
        for cookie in value.split(";"):
            found.append(cookie.partition("=")[2].strip())
        return
    scheme, space, credentials = value.partition(" ")
    credentials = credentials.strip()
    if not space or not credentials:
        return
    found.append(credentials)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return
        found.append(decoded)
        found.append(decoded.partition(":")[2])


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """text without any of the secrets (longest first, so a key never leaves a part of itself)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return text


@lru_cache(maxsize=1024)
def fingerprints(secrets: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """(fingerprint, length) of each secret redact_fingerprinted can find (one run of key characters;
    the parts of the others are secrets of their own): what the writer needs to scrub them."""
    return tuple((key_fingerprint(secret), len(secret)) for secret in secrets if _KEY_RUN.fullmatch(secret))


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




def redact_fingerprinted(text: str, secrets: Iterable[tuple[str, int]]) -> str:
    """Replace the client's credentials in text, knowing only their fingerprints and lengths: every
    substring of such a length inside a run of key characters is hashed and compared (once per
    distinct length). Runs only on error text, before it is cut to its stored length."""
    by_length: dict[int, set[str]] = {}
    for fingerprint, length in secrets:
        if length > 0:
            by_length.setdefault(length, set()).add(fingerprint)
    if not by_length:
        return text
    found: set[str] = set()
    shortest = min(by_length)
    for match in _KEY_RUN.finditer(text):
        run = match.group()
        if len(run) < shortest:
            continue
        for length, wanted in by_length.items():
            for start in range(len(run) - length + 1):
                candidate = run[start : start + length]
                digest = hashlib.sha256(candidate.encode("utf-8", "surrogateescape")).hexdigest()[:16]
                if digest in wanted:
                    found.add(candidate)
    return redact_secrets(text, found) if found else text
