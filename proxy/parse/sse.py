"""Incremental Server-Sent Events decoder (WHATWG rules), fed raw network reads.

Pure code: bytes in, events out. Each byte is looked at once (a partial line is kept as a list of
pieces and joined only when its terminator arrives), so cost is linear in the stream whatever the
read sizes. Every event carries the byte span it came from, so a caller can drop an event's exact
bytes from a passthrough stream. Memory is bounded: a line or an event's data over max_event_bytes
is discarded (that event is skipped), and decoding resumes at the next line.
"""

from __future__ import annotations

from dataclasses import dataclass

CR = 0x0D
LF = 0x0A
BOM = b"\xef\xbb\xbf"
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event: its name (b"" when none), joined data, and [start, end) in the stream.

    The span runs from the block's first line through its terminating blank line. When that blank
    line ends with a CR that is the last byte of a read, the event is dispatched at once and `end`
    moves one byte on if the next read starts with the LF of a CRLF (so spans never depend on how
    the stream was split, and dispatch never waits for the next read).
    """

    event: bytes
    data: bytes
    start: int
    end: int


class SSEDecoder:
    """Feed bytes as they arrive; get complete events back. Call close() at EOF for a trailing event."""

    __slots__ = (
        "_block_start",
        "_cr_event",
        "_data",
        "_data_bytes",
        "_discard_line",
        "_event",
        "_first_line",
        "_max_event_bytes",
        "_offset",
        "_oversized",
        "_partial",
        "_partial_bytes",
        "_skip_lf",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        self._partial: list[bytes] = []
        self._partial_bytes = 0
        self._discard_line = False
        self._skip_lf = False
        self._cr_event: SSEEvent | None = None
        self._data: list[bytes] = []
        self._data_bytes = 0
        self._event = b""
        self._offset = 0
        self._block_start = 0
        self._first_line = True
        self._oversized = False

    @property
    def offset(self) -> int:
        """Bytes fed so far."""
        return self._offset

    @property
    def boundary(self) -> int:
        """Offset where the current (incomplete) block begins; bytes before it belong to finished blocks."""
        return self._block_start

    @property
    def pending_bytes(self) -> int:
        """Bytes held for an incomplete line and event (bounded by about twice max_event_bytes)."""
        return self._partial_bytes + self._data_bytes

    @property
    def at_boundary(self) -> bool:
        """Nothing is pending: the next byte fed starts a new block."""
        return self.at_boundary_at(self._offset)

    def at_boundary_at(self, offset: int) -> bool:
        """at_boundary, for a caller in the middle of a read (offset: bytes consumed so far)."""
        return (
            self._block_start == offset
            and not self._partial
            and not self._data
            and not self._skip_lf
            and not self._discard_line
            and not self._oversized
            and not self._first_line
        )

    def restart(self) -> None:
        """Drop a partial line and event: the next byte fed starts a new block (after a gap in the
        bytes fed; not the stream's start, so no byte-order mark is looked for)."""
        self._partial.clear()
        self._partial_bytes = 0
        self._data = []
        self._data_bytes = 0
        self._event = b""
        self._discard_line = self._skip_lf = self._oversized = self._first_line = False
        self._cr_event = None
        self._block_start = self._offset

    def skip(self, chunk: bytes) -> None:
        """Account for a read of whole blocks the caller chose not to decode.

        Only valid at_boundary, for a read that ends with a blank line (b"\n\n") and has no CR.
        """
        self.advance(len(chunk))

    def advance(self, length: int) -> None:
        """skip() for `length` bytes of such blocks."""
        self._offset += length
        self._block_start = self._offset
        self._cr_event = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self.at_boundary and len(chunk) <= self._max_event_bytes and b"\r" not in chunk:
            return self._feed_lf_blocks(chunk)
        return self._feed_lines(chunk)

    def _feed_lf_blocks(self, chunk: bytes) -> list[SSEEvent]:
        """The common case, at a block boundary with LF line ends only: whole blocks are cut with one
        split, and a block that is a single `data: ` line becomes an event without the per-line work.
        Other blocks go through the same line rules; the unfinished tail takes the general path."""
        events: list[SSEEvent] = []
        blocks = chunk.split(b"\n\n")
        rest = blocks.pop()
        position = self._offset
        for block in blocks:
            end = position + len(block) + 2
            if block[:6] == b"data: " and b"\n" not in block:
                events.append(SSEEvent(b"", block[6:], position, end))
            else:
                self._block_start = line_end = position
                for line in block.split(b"\n"):
                    line_end += len(line) + 1
                    event = self._line(line, line_end)
                    if event is not None:
                        events.append(event)
                event = self._line(b"", end)
                if event is not None:
                    events.append(event)
            position = end
        self._offset = self._block_start = position
        self._cr_event = None
        if rest:
            events.extend(self._feed_lines(rest))
        return events

    def _feed_lines(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        size = len(chunk)
        if not size:
            return events
        base = self._offset
        self._offset += size
        pos = 0
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == LF:  # second half of a CRLF split across reads
                pos = 1
                if self._block_start == base:
                    self._block_start = base + 1
                if self._cr_event is not None:
                    self._cr_event.end = base + 1
        self._cr_event = None
        next_lf = chunk.find(b"\n", pos)
        next_cr = chunk.find(b"\r", pos)
        while next_lf != -1 or next_cr != -1:
            if next_cr == -1 or (next_lf != -1 and next_lf < next_cr):
                end, after = next_lf, next_lf + 1
            else:
                end = next_cr
                if end + 1 < size:
                    after = end + 2 if chunk[end + 1] == LF else end + 1
                else:
                    after = end + 1
                    self._skip_lf = True
            if self._discard_line:  # the tail of an oversized line
                self._discard_line = False
                self._partial_bytes = 0
                line = None
            else:
                line = chunk[pos:end]
                if self._partial:
                    self._partial.append(line)
                    line = b"".join(self._partial)
                    self._partial.clear()
                    self._partial_bytes = 0
            pos = after
            if line is not None and len(line) > self._max_event_bytes:
                self._oversize()
                line = None
            if line is not None:
                event = self._line(line, base + after)
                if event is not None:
                    events.append(event)
                    if self._skip_lf:
                        self._cr_event = event
                if (
                    not line
                    and next_cr == -1
                    and 0 < size - pos <= self._max_event_bytes
                    and self.at_boundary_at(base + pos)
                ):
                    # the block left open by an earlier read is done and no CR follows: whole blocks now
                    self._offset = base + pos
                    events.extend(self._feed_lf_blocks(chunk[pos:]))
                    return events
            if next_lf != -1 and next_lf < pos:
                next_lf = chunk.find(b"\n", pos)
            if next_cr != -1 and next_cr < pos:
                next_cr = chunk.find(b"\r", pos)
        if pos < size and not self._discard_line:
            self._partial_bytes += size - pos
            if self._partial_bytes > self._max_event_bytes:
                self._partial.clear()
                self._partial_bytes = 0
                self._discard_line = True
                self._oversize()
            else:
                self._partial.append(chunk[pos:] if pos else chunk)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: a last line without terminator and a pending event are dispatched."""
        events: list[SSEEvent] = []
        self._skip_lf = False
        self._cr_event = None
        if self._partial:
            line = b"".join(self._partial)
            self._partial.clear()
            self._partial_bytes = 0
            if len(line) > self._max_event_bytes:
                self._oversize()
            else:
                event = self._line(line, self._offset)
                if event is not None:
                    events.append(event)
        self._discard_line = False
        if self._data or self._oversized:
            event = self._line(b"", self._offset)
            if event is not None:
                events.append(event)
        return events

    def _oversize(self) -> None:
        """A line or the event's data went over the limit: the event is skipped, its data freed."""
        self._oversized = True
        self._first_line = False
        self._data = []
        self._data_bytes = 0

    def _line(self, line: bytes, line_end: int) -> SSEEvent | None:
        if self._first_line:
            self._first_line = False
            if line.startswith(BOM):
                line = line[3:]
        if not line:
            event = None
            if self._data and not self._oversized:
                event = SSEEvent(self._event, b"\n".join(self._data), self._block_start, line_end)
            self._data = []
            self._data_bytes = 0
            self._event = b""
            self._oversized = False
            self._block_start = line_end
            return event
        if line[0] == 0x3A:  # ':' comment
            return None
        colon = line.find(b":")
        if colon == -1:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            if self._oversized:
                return None
            self._data_bytes += len(value) + 1
            if self._data_bytes > self._max_event_bytes:
                self._oversize()
            else:
                self._data.append(value)
        elif name == b"event":
            self._event = value
        return None
