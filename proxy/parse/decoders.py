"""Content-Encoding decoders for the copy of a response that is parsed, and the bounded body copy.

The client's bytes are never decoded (they pass through compressed); only the copy parsed for the
ledger is, and never past MAX_PARSED_BODY.
"""

from __future__ import annotations

import zlib
from typing import Protocol

MAX_PARSED_BODY = 16 * 1024 * 1024


class Decompressor(Protocol):
    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...


class UnsupportedEncoding(ValueError):
    pass


def _normalized(encoding: str | None) -> str:
    return (encoding or "identity").strip().lower() or "identity"


def is_identity(encoding: str | None) -> bool:
    """A Content-Encoding that leaves the bytes as they are (none given counts)."""
    return _normalized(encoding) == "identity"


def make_decompressor(encoding: str | None) -> Decompressor | None:
    """A decoder for a Content-Encoding, None for identity; UnsupportedEncoding for anything else."""
    encoding = _normalized(encoding)
    if encoding == "identity":
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)
    if encoding == "br":
        try:
            import brotli  # type: ignore[import-not-found]
        except ImportError:
            raise UnsupportedEncoding(encoding) from None
        return _Brotli(brotli.Decompressor())
    raise UnsupportedEncoding(encoding)


class _Brotli:
    def __init__(self, decoder: object) -> None:
        self._decoder = decoder

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return self._decoder.process(data)  # type: ignore[attr-defined,no-any-return]


class BodyTap:
    """Keeps a bounded, decoded copy of a non-streaming body for parsing."""

    __slots__ = ("_decoder", "_parts", "_size", "failure")

    def __init__(self, encoding: str | None) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self.failure: str | None = None
        try:
            self._decoder = make_decompressor(encoding)
        except UnsupportedEncoding as exc:
            self._decoder = None
            self.failure = f"content-encoding {exc} not decoded for logging"

    def feed(self, chunk: bytes) -> None:
        if self.failure is not None:
            return
        data = chunk
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(chunk, MAX_PARSED_BODY - self._size + 1)
            except (zlib.error, OSError, ValueError) as exc:
                self.failure = f"response body could not be decoded ({exc})"
                self._parts.clear()
                return
        self._size += len(data)
        if self._size > MAX_PARSED_BODY:
            self.failure = f"response body over {MAX_PARSED_BODY // (1024 * 1024)} MiB not parsed"
            self._parts.clear()
            return
        self._parts.append(data)

    def body(self) -> bytes | None:
        if self.failure is not None:
            return None
        return self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)


