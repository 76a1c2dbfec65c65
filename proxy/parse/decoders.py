"""Content-Encoding decoders for the copy of a response that is parsed, and the bounded body copy.

The client's bytes are never decoded (they pass through compressed); only the copy parsed for the
ledger is, and never past MAX_PARSED_BODY.
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol

MAX_PARSED_BODY = 16 * 1024 * 1024
DECODE_STEP = 256 * 1024  # the most one decompress call may produce: no single call inflates a bomb


class Decompressor(Protocol):
    """One Content-Encoding's decoder, bounded per call: at most max_length bytes out; `pending` is True
    while it holds input or output it could not return within that bound."""

    def decompress(self, data: bytes, max_length: int) -> bytes: ...

    @property
    def pending(self) -> bool: ...


class UnsupportedEncoding(ValueError):
    pass


class DecodeError(ValueError):
    pass


def _normalized(encoding: str | None) -> str:
    return (encoding or "identity").strip().lower() or "identity"


def is_identity(encoding: str | None) -> bool:
    """A Content-Encoding that leaves the bytes as they are (none given counts)."""
    return _normalized(encoding) == "identity"


def make_decompressor(encoding: str | None) -> Decompressor | None:
    """A decoder for a Content-Encoding, None for identity; UnsupportedEncoding for anything else, and for
    br or zstd when no module that can bound its output is installed."""
    encoding = _normalized(encoding)
    if encoding == "identity":
        return None
    if encoding in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return _Zlib(32 + zlib.MAX_WBITS)
    if encoding == "br":
        return _Brotli.make(encoding)
    if encoding == "zstd":
        return _Zstd.make(encoding)
    raise UnsupportedEncoding(encoding)


class _Zlib:
    __slots__ = ("_decoder",)

    def __init__(self, wbits: int) -> None:
        self._decoder = zlib.decompressobj(wbits)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        try:
            return self._decoder.decompress(data or self._decoder.unconsumed_tail, max_length)
        except zlib.error as exc:
            raise DecodeError(str(exc)) from None

    @property
    def pending(self) -> bool:
        return bool(self._decoder.unconsumed_tail)


class _Brotli:
    """The `brotli` module from 1.2 on: older releases cannot bound a call's output, so br is left
    undecoded with them."""

    __slots__ = ("_decoder", "_error")

    def __init__(self, module: Any) -> None:
        self._decoder = module.Decompressor()
        self._error = module.error

    @classmethod
    def make(cls, encoding: str) -> _Brotli:
        try:
            import brotli  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError:
            raise UnsupportedEncoding(encoding) from None
        if not hasattr(brotli.Decompressor, "can_accept_more_data"):
            raise UnsupportedEncoding(encoding)
        return cls(brotli)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        try:
            return self._decoder.process(data, output_buffer_limit=max_length)  # type: ignore[no-any-return]
        except self._error as exc:
            raise DecodeError(str(exc)) from None

    @property
    def pending(self) -> bool:
        return not self._decoder.can_accept_more_data()


class _Zstd:
    """zstd through the standard library's compression.zstd (3.14) or its backport."""

    __slots__ = ("_decoder", "_error", "_module")

    def __init__(self, module: Any) -> None:
        self._module = module
        self._decoder = module.ZstdDecompressor()
        self._error = module.ZstdError

    @classmethod
    def make(cls, encoding: str) -> _Zstd:
        try:
            from compression import zstd  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            try:
                from backports import zstd  # type: ignore[import-not-found,no-redef,unused-ignore]
            except ImportError:
                raise UnsupportedEncoding(encoding) from None
        return cls(zstd)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        try:
            if self._decoder.eof:  # a frame ended: what follows is the next frame
                data, self._decoder = self._decoder.unused_data + data, self._module.ZstdDecompressor()
            return self._decoder.decompress(data, max_length)  # type: ignore[no-any-return]
        except (self._error, EOFError) as exc:
            raise DecodeError(str(exc)) from None

    @property
    def pending(self) -> bool:
        return not self._decoder.needs_input and not self._decoder.eof


class BoundedDecoder:
    """A Content-Encoding decoder bounded on output: per decompress call (DECODE_STEP) and per response
    (`limit`). Past the limit it stops decoding and sets `over`: a few kilobytes of input cannot cost
    the writer a gigabyte of memory or seconds of CPU."""

    __slots__ = ("_decoder", "limit", "over", "size")

    def __init__(self, decoder: Decompressor, limit: int = MAX_PARSED_BODY) -> None:
        self._decoder = decoder
        self.limit = limit
        self.size = 0
        self.over = False

    def decode(self, data: bytes) -> bytes:
        """The decoded bytes of the next input, at most what is left of the limit; DecodeError when the
        input is not valid in its encoding."""
        if self.over:
            return b""
        parts = []
        decoder = self._decoder
        while True:
            room = self.limit - self.size
            step = min(DECODE_STEP, room + 1)
            out = decoder.decompress(data, step)
            data = b""
            self.size += len(out)
            if self.size > self.limit:
                self.over = True
                parts.append(out[: len(out) - (self.size - self.limit)])
                self.size = self.limit
                break
            parts.append(out)
            if len(out) < step and not decoder.pending:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)


def bounded_decoder(encoding: str | None, limit: int = MAX_PARSED_BODY) -> BoundedDecoder | None:
    """make_decompressor's decoder, bounded; None for identity (UnsupportedEncoding as there)."""
    decoder = make_decompressor(encoding)
    return None if decoder is None else BoundedDecoder(decoder, limit)


def decode_reads(
    chunks: list[bytes], times: list[float], encoding: str | None
) -> tuple[list[bytes], list[float], str | None]:
    """An encoded event stream's reads decoded (each keeps its arrival time), at most MAX_PARSED_BODY of
    them, and why decoding stopped early (None when it did not)."""
    try:
        decoder = bounded_decoder(encoding)
    except UnsupportedEncoding as exc:
        return [], [], f"content-encoding {exc} not decoded for logging"
    if decoder is None:
        return chunks, times, None
    out: list[bytes] = []
    out_times: list[float] = []
    for chunk, at in zip(chunks, times, strict=True):
        try:
            data = decoder.decode(chunk)
        except DecodeError as exc:
            return out, out_times, f"event stream could not be decoded ({exc}); parsed what came before"
        if data:
            out.append(data)
            out_times.append(at)
        if decoder.over:
            return out, out_times, (
                f"event stream over {MAX_PARSED_BODY // (1024 * 1024)} MiB once decoded; parsed its first "
                f"{MAX_PARSED_BODY // (1024 * 1024)} MiB"
            )
    return out, out_times, None


class BodyTap:
    """Keeps a bounded, decoded copy of a non-streaming body for parsing."""

    __slots__ = ("_decoder", "_parts", "_size", "failure")

    def __init__(self, encoding: str | None) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self.failure: str | None = None
        try:
            self._decoder = bounded_decoder(encoding, MAX_PARSED_BODY)
        except UnsupportedEncoding as exc:
            self._decoder = None
            self.failure = f"content-encoding {exc} not decoded for logging"

    def feed(self, chunk: bytes) -> None:
        if self.failure is not None:
            return
        data = chunk
        if self._decoder is not None:
            try:
                data = self._decoder.decode(chunk)
            except DecodeError as exc:
                self.failure = f"response body could not be decoded ({exc})"
                self._parts.clear()
                return
        self._size += len(data)
        if self._size > MAX_PARSED_BODY or (self._decoder is not None and self._decoder.over):
            self.failure = f"response body over {MAX_PARSED_BODY // (1024 * 1024)} MiB not parsed"
            self._parts.clear()
            return
        self._parts.append(data)

    def body(self) -> bytes | None:
        if self.failure is not None:
            return None
        return self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)


