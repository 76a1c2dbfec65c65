"""Embeddings (`POST .../embeddings`) as a JSON body: model and input tokens; no choices, no output.

`completion_tokens` stays NULL (nothing is generated); the price table bills the input rate only.
"""

from __future__ import annotations

import orjson

from .chat_json import apply_meta
from .fields import error_text
from .record import CompletionRecord
from .usage import apply_usage


def parse_embeddings_body(record: CompletionRecord, body: bytes) -> bool:
    """Fill the record from an embeddings list (or an error envelope). False: neither."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(obj, dict):
        return False
    if not isinstance(obj.get("data"), list) and not isinstance(obj.get("usage"), dict):
        error = error_text(obj.get("error"))
        if error:
            record.error = error
        return error is not None
    apply_meta(record, obj)
    usage = obj.get("usage")
    if isinstance(usage, dict):
        apply_usage(record, usage)
    return True
