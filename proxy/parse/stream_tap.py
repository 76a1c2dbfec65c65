"""StreamTap: an SSE response's reads folded into a record, and optionally the usage chunk the proxy
asked for cut out of the client's bytes.

Pure code (no sockets): it is fed every read and the time it arrived, and never raises into the
request path; whatever cannot be decoded is noted and left for the record.
"""

from __future__ import annotations

from typing import Protocol

import orjson

from .chat_stream import StreamFolder
from .decoders import DecodeError, UnsupportedEncoding, bounded_decoder
from .record import CompletionRecord
from .sse import SSEDecoder, SSEEvent
from .stream_bytes import first_empty_array, may_hold_empty_array

MAX_HELD_BYTES = 1024 * 1024
SETTLE_BYTES = 2048  # a read longer than twice this is fed in two parts: the first may settle the fold
SETTLE_BLOCKS = 16  # feed_all: events of one read fed one by one before the fold settles
TAIL_BYTES = 2048  # what feed_all parses at least of a settled stream of unusual shape: finish, usage, [DONE]
# The writer's work per response is bounded: past FOLD_BUDGET_BYTES decoded and parsed (or
# FOLD_BUDGET_EVENTS events), the middle of a stream is skipped and only its last FOLD_TAIL_BYTES (finish
# reasons, usage) are parsed. Streams of the usual shape never get near it: once settled, their plain
# deltas are skipped without parsing.
FOLD_BUDGET_BYTES = 512 * 1024
FOLD_BUDGET_EVENTS = 20_000
FOLD_TAIL_BYTES = 64 * 1024
FOLD_PIECE = 64 * 1024  # reads are fed in pieces about this long, so the budget is checked often enough


def _names_provider(data: bytes) -> bool:
    """A chunk with a top-level `provider` (OpenRouter's)."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and bool(chunk.get("provider"))


class Folder(Protocol):
    """A wire format's stream fold (chat_stream.StreamFolder, responses_stream, messages_stream)."""

    record: CompletionRecord
    settled: bool  # what the fold needs from content deltas is known: quiet blocks may pass unparsed
    done: bool  # the stream's own end marker came ([DONE], a terminal event)
    failed: bool
    data_events: int
    parsed_events: int

    def feed(self, data: bytes, event: bytes = b"") -> tuple[bool, bool]:
        """One event's data and name; returns (carries_content, is_the_usage_chunk_the_proxy_asked_for)."""
        ...

    def finish(self, at_eof: bool = False) -> None: ...

    def quiet(self, blocks: bytes) -> bool:
        """Whole LF-only SSE blocks of a settled fold that certainly change nothing."""
        ...

    def quiet_prefix(self, data: bytes, keep: int) -> int: ...


class StreamTap:
    """Decodes an SSE response into a Folder (a chat StreamFolder unless given), and optionally removes
    the usage-only chunk (the one the client did not ask for: the proxy added
    stream_options.include_usage to its request).

    In strip mode, bytes are handed on per complete event block (an event is needed whole to decide
    whether it goes); otherwise every read is passed on untouched, the moment it arrives.
    """

    __slots__ = (
        "_cr_drop",
        "_decoder",
        "_folded",
        "_held",
        "_held_start",
        "_quiet",
        "_readable",
        "_sse",
        "_strip",
        "_strip_only",
        "decode_failure",
        "first_content_at",
        "first_event_at",
        "folder",
        "stripped",
    )

    def __init__(
        self,
        record: CompletionRecord,
        encoding: str | None,
        strip_usage_chunk: bool,
        expected_choices: int = 1,
        strip_only: bool = False,
        folder: Folder | None = None,
    ) -> None:
        self.folder: Folder = folder if folder is not None else StreamFolder(record, expected_choices)
        # strip_only: the record is folded elsewhere (the writer, from a raw copy). After the first event,
        # only the blocks that could hold the usage-only chunk need decoding: whether a chunk is that
        # one is read off the chunk itself, and so is the provider that spares it (see _event).
        self._strip_only = strip_only
        self._sse = SSEDecoder()
        self._readable = True
        self.decode_failure: str | None = None  # why an encoded stream stopped being decoded
        self._folded = 0  # bytes decoded and parsed (see FOLD_BUDGET_BYTES)
        try:
            self._decoder = bounded_decoder(encoding)
        except UnsupportedEncoding:
            self._decoder = None
            self._readable = False  # cannot read it: passthrough only
        self._strip = strip_usage_chunk and self._decoder is None and self._readable
        self._held = bytearray()
        self._held_start = 0
        self._cr_drop: SSEEvent | None = None
        self.first_event_at: float | None = None
        self.first_content_at: float | None = None
        self.stripped = 0
        self._quiet = False  # see feed

    @property
    def stripping(self) -> bool:
        return self._strip

    def feed(self, chunk: bytes, now: float) -> bytes:
        """Take one upstream read; returns the bytes to send the client now.

        _quiet is the steady state of a strip-only tap (the request path of a stream whose usage chunk
        is cut): ready, at a block boundary, nothing held. A read of whole LF-only blocks with no empty
        array then passes with one search, as _feed_read would pass it after a dozen calls."""
        if self._quiet and chunk[-2:] == b"\n\n" and b"\r" not in chunk and not may_hold_empty_array(chunk):
            self._sse.skip(chunk)
            self._held_start = self._sse.offset
            return chunk
        split = self._settling_split(chunk)
        if split:
            out = self._feed_read(chunk[:split], now) + self._feed_read(chunk[split:], now)
        else:
            out = self._feed_read(chunk, now)
        if self._strip_only:
            self._quiet = (
                self._strip and self._ready and not self._held and self._cr_drop is None and self._sse.at_boundary
            )
        return out

    @property
    def _ready(self) -> bool:
        """Reads may pass undecoded from here on, but for the blocks _quiet_blocks keeps for decoding:
        once the fold is settled, or for a strip-only tap once its first event is decoded."""
        return self.folder.settled or (self._strip_only and self.folder.data_events > 0)

    def _settling_split(self, chunk: bytes) -> int:
        """Where to cut a big read while the tap is not _ready (0: don't): its first events may make it
        ready, and the rest can then pass undecoded. A strip-only tap cuts after the first block."""
        if self._ready:
            return 0
        if self._strip_only:
            split = chunk.find(b"\n\n") + 2
        elif len(chunk) <= 2 * SETTLE_BYTES:
            return 0
        else:
            split = chunk.find(b"\n\n", SETTLE_BYTES) + 2
        return split if 2 <= split < len(chunk) else 0

    def _feed_read(self, chunk: bytes, now: float) -> bytes:
        if self._ready and self._decoder is None and self._sse.at_boundary and b"\r" not in chunk:
            quiet = self._quiet_blocks(chunk)
            if quiet == len(chunk):  # whole blocks with nothing to learn and nothing to cut: undecoded
                self._skip(chunk)
                return chunk
            if quiet:
                head = chunk[:quiet]
                self._skip(head)
                return head + self._decode(chunk[quiet:], now)
        return self._decode(chunk, now)

    def _quiet_blocks(self, chunk: bytes) -> int:
        """How many leading bytes of a read (at a block boundary, LF only) are whole blocks that change
        nothing: for a strip-only tap, the blocks before the first possible usage-only chunk."""
        if self._strip_only:
            limit = first_empty_array(chunk)
            end = chunk.rfind(b"\n\n", 0, len(chunk) if limit < 0 else limit)
            return end + 2 if end >= 0 else 0
        return len(chunk) if chunk.endswith(b"\n\n") and self.folder.quiet(chunk) else 0

    def _skip(self, blocks: bytes) -> None:
        self._sse.skip(blocks)
        if self._strip:
            self._held_start = self._sse.offset

    def _decode(self, chunk: bytes, now: float) -> bytes:
        drops: list[SSEEvent] = []
        if self._readable:
            self._folded += len(chunk)
            data = chunk
            decoder = self._decoder
            if decoder is not None:
                try:
                    data = decoder.decode(chunk)
                except DecodeError as exc:
                    self._readable = False
                    self.decode_failure = f"event stream could not be decoded ({exc})"
                    data = b""
                if decoder.over:  # bounded per response: a compression bomb stops here
                    self._readable = False
                    self.decode_failure = f"event stream over {decoder.limit // (1024 * 1024)} MiB once decoded"
            for event in self._sse.feed(data):
                self._event(event, now, drops)
        if not self._strip:
            return chunk
        if self._cr_drop is not None:
            if self._cr_drop.end > self._held_start:  # the LF of a dropped event's CRLF opened this read
                chunk = chunk[1:]
                self._held_start += 1
            self._cr_drop = None
        if not drops and not self._held and self._sse.boundary == self._sse.offset:
            self._held_start = self._sse.offset
            return chunk
        self._held += chunk
        out = self._release(drops, self._sse.boundary)
        if drops and drops[-1].end == self._sse.offset:
            self._cr_drop = drops[-1]
        return out

    def feed_all(self, chunks: list[bytes], times: list[float]) -> None:
        """Fold a whole captured stream (the writer's case: every read is already here).

        Until the folder is settled, reads are fed one event block at a time (at most SETTLE_BLOCKS of
        a read; the rest of it whole): a read usually holds many events, and the first two or three
        settle the fold. Of the rest, only the last few blocks are parsed when the folder's quiet_prefix
        proves that the part before them changes nothing. Per-read times matter only until settled
        (first event, first content).
        """
        pending: list[bytes] = []
        folder = self.folder
        for index, (chunk, at) in enumerate(zip(chunks, times, strict=True)):
            start = 0
            if self._decoder is None:
                for _ in range(SETTLE_BLOCKS):
                    end = chunk.find(b"\n\n", start) + 2
                    if end < 2 or end >= len(chunk) or folder.settled:
                        break
                    self._feed_read(chunk[start:end], at)
                    start = end
            if start:
                chunk = chunk[start:]
            if not folder.settled and not self._spent:
                chunk = self._feed_pieces(chunk, at, until_settled=True)
                if not chunk:
                    continue
            pending = [chunk, *chunks[index + 1 :]]
            break
        if not pending:
            return
        rest = pending[0] if len(pending) == 1 else b"".join(pending)
        if self._spent:
            self._fold_tail(rest, times[-1])
        else:
            self._fold_settled(rest, times[-1])

    @property
    def _spent(self) -> bool:
        """The fold budget of this response is used up (see FOLD_BUDGET_BYTES)."""
        return self._folded > FOLD_BUDGET_BYTES or self.folder.data_events > FOLD_BUDGET_EVENTS

    def _feed_pieces(self, data: bytes, now: float, until_settled: bool = False) -> bytes:
        """Feed data in pieces of about FOLD_PIECE (cut after a block) while the budget lasts (and, with
        until_settled, until the fold settles); returns what was not fed."""
        if len(data) <= FOLD_PIECE:
            self.feed(data, now)
            return b""
        position = 0
        while position < len(data):
            if self._spent or (until_settled and self.folder.settled):
                return data[position:]
            end = data.find(b"\n\n", position + FOLD_PIECE) + 2
            end = len(data) if end < 2 else end
            self.feed(data[position:end], now)
            position = end
        return b""

    def _fold_tail(self, rest: bytes, now: float) -> None:
        """The budget is spent: fold only the last FOLD_TAIL_BYTES of the stream, from a block boundary."""
        if self._decoder is not None or not self._readable:
            return
        if len(rest) > FOLD_TAIL_BYTES:
            rest = rest[-FOLD_TAIL_BYTES:]
            start = rest.find(b"\n\n") + 2
            if start < 2:
                return
            rest = rest[start:]
            self._sse.restart()
        elif not self._sse.at_boundary:
            self._sse.restart()
        self.feed(rest, now)

    def resume_after_gap(self, data: bytes, now: float) -> None:
        """Fold the last reads of a stream whose middle was not kept (over MAX_PARSED_BODY): decoding
        starts over at the first block boundary, and what the middle held is not known."""
        start = data.find(b"\n\n") + 2
        if start < 2 or self._decoder is not None:
            return
        self._sse.restart()
        if self._spent:
            self._fold_tail(data[start:], now)
        else:
            self._fold_settled(data[start:], now)

    def _fold_settled(self, rest: bytes, now: float) -> None:
        """Fold the rest of a stream: only its last blocks when the folder's quiet_prefix proves the part
        before them changes nothing; within the fold budget, then only its tail."""
        if self._decoder is None and self._readable and not self._strip and len(rest) > TAIL_BYTES:
            if not self._sse.at_boundary:  # finish the event a read cut in two
                end = rest.find(b"\n\n") + 2
                if end >= 2:
                    self.feed(rest[:end], now)
                    rest = rest[end:]
            cut = self.folder.quiet_prefix(rest, TAIL_BYTES) if self._sse.at_boundary else 0
            if cut:
                self._sse.advance(cut)
                rest = rest[cut:]
        if self._strip:
            self.feed(rest, now)
            return
        rest = self._feed_pieces(rest, now)
        if rest:
            self._fold_tail(rest, now)

    def close(self, now: float, complete: bool = True) -> bytes:
        """End of stream: fold a trailing unterminated event; returns any bytes still held back.

        complete is False when the upstream connection failed (the failure, not an unfinished
        completion, is then what the record reports).
        """
        drops: list[SSEEvent] = []
        if self._readable:
            for event in self._sse.close():
                self._event(event, now, drops)
        self.folder.finish(at_eof=complete)
        if not self._strip:
            return b""
        return self._release(drops, self._held_start + len(self._held))

    def _event(self, event: SSEEvent, now: float, drops: list[SSEEvent]) -> None:
        data = event.data
        if self.first_event_at is None and not self.folder.done and not data.startswith(b"[DONE]"):
            self.first_event_at = now
        carries_content, usage_only = self.folder.feed(data, event.event)
        if carries_content and self.first_content_at is None:
            self.first_content_at = now
        # OpenRouter (the only upstream with a top-level `provider`) sends usage whether asked or not:
        # its client would get the chunk without the proxy, so it stays. The chunk itself says so (it
        # names the provider, as every OpenRouter chunk does): a strip-only tap does not decode the
        # chunks before it, so an earlier chunk must not decide.
        if usage_only and self._strip and not _names_provider(data):
            drops.append(event)
            self.stripped += 1

    def _release(self, drops: list[SSEEvent], upto: int) -> bytes:
        start = self._held_start
        out = bytearray()
        cursor = start
        for drop in drops:
            if drop.start > cursor:
                out += self._held[cursor - start : drop.start - start]
            cursor = max(cursor, drop.end)
        if upto > cursor:
            out += self._held[cursor - start : upto - start]
        del self._held[: max(upto, cursor) - start]
        self._held_start = max(upto, cursor)
        if len(self._held) > MAX_HELD_BYTES:  # a huge partial event: stop holding, pass bytes on
            out += self._held
            self._held_start += len(self._held)
            self._held.clear()
            self._strip = False
        return bytes(out)
