"""Byte-level shortcuts over a chat stream: which blocks certainly change nothing in a settled fold.

Parsing every chunk of a long stream costs more than the rest of logging it. Once a fold is settled
(identity, first content and every choice's role known), these searches prove that a run of blocks holds
only plain content deltas, so it need not be parsed: a marker search (`chunk_may_matter`), or for the
usual stream of same-shape deltas a count of joints, quotes and newlines (`same_shape`). Unusual
spacing or escapes only make the answer "parse it".
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from .chat_stream import StreamFolder

_ALWAYS_PARSE = (b'"error"', b"x_groq", b"[DONE]")


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


def content_template(payload: bytes) -> tuple[bytes, bytes] | None:
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


def quiet_prefix(folder: StreamFolder, data: bytes, keep: int) -> int:
    """How many leading bytes of `data` (whole SSE blocks, at a block boundary) certainly change
    nothing in a settled fold: what is left must be parsed.

    All but the last `keep` bytes, if skippable proves them quiet; for the usual long stream of
    same-shape deltas, more: up to the last joint between two such blocks (what follows is the
    finish, the usage and [DONE]). (OpenAI's blocks, with a random `obfuscation` string in each,
    rarely share a joint: skippable proves them after emptying those strings.)"""
    if not folder.settled:
        return 0
    cut = data.rfind(b"\n\n", 0, len(data) - keep) + 2
    first = data.find(b"\n\n")
    template = content_template(data[6:first]) if data.startswith(b"data: ") and first > 6 else None
    if template is not None:
        tail = template[1] + b"\n\n"
        joint = data.rfind(tail + b"data: " + template[0], max(cut, 0)) + len(tail)  # the last few KB
        if joint > cut and same_shape(folder, data[:joint]):
            return joint
    return cut if cut >= 2 and skippable(folder, data[:cut]) else 0


def skippable(folder: StreamFolder, blocks: bytes) -> bool:
    """True when whole SSE blocks certainly change nothing in a settled fold: the fast proof of
    same_shape when it applies, chunk_may_matter's marker search otherwise. Never with a CR: the
    caller skips by byte count, which needs LF-only blocks."""
    if not folder.settled or b"\r" in blocks:
        return False
    same = same_shape(folder, blocks)
    if same is None and b"\\" not in blocks and _OBFUSCATED in blocks[: blocks.find(b"\n\n")]:
        same = same_shape(folder, _OBFUSCATION.sub(_OBFUSCATED + b'"', blocks))
    return (not chunk_may_matter(blocks)) if same is None else same


def same_shape(folder: StreamFolder, blocks: bytes) -> bool | None:
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
    template = content_template(payload)
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
    return type(obj) is dict and folder.plain_delta(obj)
