"""The incremental SSE decoder: WHATWG line and field rules, exact byte spans, any split of the input,
bounded memory, and linear cost.

A small whole-stream reference decoder (regex lines, no incremental state) is the oracle for the
property tests; the realistic streams of tests/stream_payloads.py are checked at every split point.
"""

from __future__ import annotations

import gc
import itertools
import re
import time
from collections.abc import Iterable

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder as OpenAISSEDecoder

from proxy.parse.sse import SSEDecoder, SSEEvent

from .stream_payloads import CASES, StreamCase

Event = tuple[bytes, bytes, int, int]
BOM = b"\xef\xbb\xbf"


def events_of(items: Iterable[SSEEvent]) -> list[Event]:
    return [(e.event, e.data, e.start, e.end) for e in items]


def decode(pieces: Iterable[bytes], max_event_bytes: int | None = None) -> list[Event]:
    """Feed the pieces one by one, then close; spans are read at the end (they are final then)."""
    decoder = SSEDecoder() if max_event_bytes is None else SSEDecoder(max_event_bytes)
    out: list[SSEEvent] = []
    for piece in pieces:
        out += decoder.feed(piece)
    out += decoder.close()
    return events_of(out)


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *cuts})
    return [data[a:b] for a, b in itertools.pairwise(points)]


_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")


def reference(stream: bytes, max_event_bytes: int = 1 << 62) -> list[Event]:
    """WHATWG event-stream parsing of a whole stream at once (no incremental state to get wrong)."""
    events: list[Event] = []
    state = {"start": 0, "data": [], "size": 0, "name": b"", "over": False, "first": True}

    def line(raw: bytes, end: int) -> None:
        if len(raw) > max_event_bytes:
            state.update(over=True, data=[], size=0, first=False)
            return
        if state["first"]:
            state["first"] = False
            raw = raw.removeprefix(BOM)
        if not raw:
            if state["data"] and not state["over"]:
                events.append((state["name"], b"\n".join(state["data"]), state["start"], end))
            state.update(start=end, data=[], size=0, name=b"", over=False)
            return
        if raw.startswith(b":"):
            return
        name, colon, value = raw.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data" and not state["over"]:
            state["size"] += len(value) + 1
            if state["size"] > max_event_bytes:
                state.update(over=True, data=[], size=0)
            else:
                state["data"].append(value)
        elif name == b"event":
            state["name"] = value

    position = 0
    for match in _LINE.finditer(stream):
        line(match.group(1), match.end())
        position = match.end()
    if position < len(stream):
        line(stream[position:], len(stream))
    if state["data"] or state["over"]:
        line(b"", len(stream))
    return events


# --- line endings -------------------------------------------------------------------------------


def test_lf_cr_crlf_mixed_in_one_stream() -> None:
    stream = b"data: a\n\ndata: b\r\rdata: c\r\n\r\ndata: d\n\r\n"
    assert decode([stream]) == [
        (b"", b"a", 0, 9),
        (b"", b"b", 9, 18),
        (b"", b"c", 18, 29),
        (b"", b"d", 29, 39),
    ]


def test_crlf_split_across_reads_is_one_line_ending() -> None:
    # If the LF opening the second read were a line of its own, "a" would be dispatched alone.
    assert decode([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [(b"", b"a\nb", 0, 20)]


def test_crlf_blank_line_split_across_reads_ends_the_event_after_the_lf() -> None:
    decoder = SSEDecoder()
    [event] = decoder.feed(b"data: a\r\n\r")
    assert (event.data, event.start, event.end) == (b"a", 0, 10)  # dispatched without waiting
    assert decoder.boundary == 10
    assert decoder.feed(b"\ndata: b\r\n\r\n") == [SSEEvent(b"", b"b", 11, 22)]
    assert (event.start, event.end) == (0, 11)  # the LF belonged to the first event's blank line
    assert decoder.boundary == 22


def test_cr_at_end_of_read_followed_by_other_byte_is_a_bare_cr() -> None:
    decoder = SSEDecoder()
    [event] = decoder.feed(b"data: a\r\r")
    assert decoder.feed(b"data: b\r\r") == [SSEEvent(b"", b"b", 9, 18)]
    assert (event.start, event.end) == (0, 9)


# --- fields ------------------------------------------------------------------------------------------


def test_comments_are_ignored_and_a_comment_block_is_no_event() -> None:
    stream = b": OPENROUTER PROCESSING\n\n:keepalive\ndata: x\n: inside\n\n"
    assert decode([stream]) == [(b"", b"x", 25, len(stream))]


def test_multi_line_data_is_joined_with_lf() -> None:
    stream = b'data: {"a":\ndata: 1}\n\n'
    assert decode([stream]) == [(b"", b'{"a":\n1}', 0, len(stream))]


@pytest.mark.parametrize(
    ("line", "data"),
    [
        (b'data: {"x":1}', b'{"x":1}'),
        (b'data:{"x":1}', b'{"x":1}'),
        (b"data:  two spaces", b" two spaces"),
        (b"data", b""),
        (b"data:", b""),
        (b"data: a: b", b"a: b"),
    ],
)
def test_data_field_value(line: bytes, data: bytes) -> None:
    assert decode([line + b"\n\n"]) == [(b"", data, 0, len(line) + 2)]


def test_event_name_applies_to_its_event_only() -> None:
    stream = b"event: message\ndata: 1\n\ndata: 2\n\nevent:error\ndata: 3\n\n"
    assert [(e, d) for e, d, _, _ in decode([stream])] == [(b"message", b"1"), (b"", b"2"), (b"error", b"3")]


def test_unknown_fields_id_retry_and_colonless_names_are_ignored() -> None:
    event = b"id: 7\nretry: 100\nfoo: bar\nnocolon\ndata: x\n\n"
    assert decode([event + b"id: 8\n\n"]) == [(b"", b"x", 0, len(event))]


def test_event_without_data_is_not_dispatched() -> None:
    assert decode([b"event: ping\n\n"]) == []


def test_bom_at_start_is_stripped_even_split_across_reads() -> None:
    stream = BOM + b"data: x\n\n"
    assert decode([stream]) == [(b"", b"x", 0, len(stream))]
    assert decode([stream[:1], stream[1:2], stream[2:]]) == [(b"", b"x", 0, len(stream))]


def test_bom_later_in_the_stream_is_not_stripped() -> None:
    # "\ufeffdata" is then an unknown field name.
    assert decode([b"data: a\n\n" + BOM + b"data: b\n\n"]) == [(b"", b"a", 0, 9)]


def test_stray_blank_lines_are_harmless() -> None:
    stream = b"\n\r\n\rdata: x\n\n\n\n"
    assert decode([stream]) == [(b"", b"x", 4, 13)]


def test_done_is_an_ordinary_event_for_the_decoder() -> None:
    assert decode([b"data: [DONE]\n\n"]) == [(b"", b"[DONE]", 0, 14)]


def test_last_event_without_blank_line_is_flushed_by_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [SSEEvent(b"", b"a", 0, 9)]
    assert decoder.close() == [SSEEvent(b"", b"b", 9, 17)]


def test_last_line_without_terminator_is_flushed_by_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b") == [SSEEvent(b"", b"a", 0, 9)]
    assert decoder.close() == [SSEEvent(b"", b"b", 9, 16)]


def test_close_with_nothing_pending_gives_nothing() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\n: comment\n")
    assert decoder.close() == []


def test_spans_cut_the_stream_into_exact_event_bytes() -> None:
    blocks = [b": hi\n\n", b"event: e\ndata: 1\r\n\r\n", b"data: 2\r\r", b"\n", b"data: 3\n\n"]
    stream = b"".join(blocks)
    events = decode([stream])
    # "\r\r\n" is a CR line end and then a CRLF blank line: the LF belongs to event 2.
    assert [stream[s:e] for _, _, s, e in events] == [blocks[1], blocks[2] + blocks[3], blocks[4]]


def test_offset_and_boundary_track_blocks() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: 1\n\ndata: 2")
    assert (decoder.offset, decoder.boundary) == (16, 9)
    decoder.feed(b"\n\n")
    assert (decoder.offset, decoder.boundary) == (18, 18)


# --- oversized events and memory ---------------------------------------------------------------------------


def test_oversized_event_is_skipped_and_the_next_one_decodes() -> None:
    big = b"data: " + b"x" * 100 + b"\n\n"
    stream = big + b"data: ok\n\n"
    expected = [(b"", b"ok", len(big), len(stream))]
    assert decode([stream], max_event_bytes=64) == expected
    assert decode(split_at(stream, range(0, len(stream), 10)), max_event_bytes=64) == expected


def test_oversized_line_tail_is_not_read_as_a_field() -> None:
    # The line is cut off while buffering; what follows on the same line must not become "data: evil".
    pieces = [b"data: ok\n", b": " + b"x" * 80, b"data: evil\n\n"]
    assert decode(pieces, max_event_bytes=64) == []


def test_many_empty_data_lines_count_towards_the_limit() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    for _ in range(5000):
        assert decoder.feed(b"data\n") == []
        assert decoder.pending_bytes <= 1000
    assert decoder.feed(b"\ndata: next\n\n") == [SSEEvent(b"", b"next", 25001, 25013)]


# --- realistic streams: every split point -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_realistic_stream_decodes_the_same_at_every_split_point(case: StreamCase) -> None:
    body = case.body
    whole = decode([body])
    assert whole == reference(body)
    payloads = [d for _, d, _, _ in whole if d != b"[DONE]"]
    assert [orjson.loads(d) for d in payloads[: len(case.chunks)]] == list(case.chunks)
    for cut in range(len(body) + 1):
        assert decode([body[:cut], body[cut:]]) == whole, cut


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_realistic_stream_spans_are_its_blocks(case: StreamCase) -> None:
    body = case.body
    spans = {body[s:e] for _, _, s, e in decode([body])}
    data_blocks = {b for b in case.blocks if not b.startswith(b":")}
    assert spans == data_blocks


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_realistic_stream_matches_the_openai_sdk_decoder(case: StreamCase) -> None:
    """Same events as openai._streaming.SSEDecoder, which drops an event left open at EOF."""
    body = case.body
    reads = [body[i : i + 7] for i in range(0, len(body), 7)]
    sdk = [(s.event or "", s.data) for s in OpenAISSEDecoder().iter_bytes(iter(reads))]
    terminated = [(e, d) for e, d, _, end in decode([body]) if body[:end].endswith((b"\n", b"\r"))]
    assert [(e.decode(), d.decode()) for e, d in terminated] == sdk


# --- property tests -----------------------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12)
_line = st.one_of(
    st.tuples(st.just("data: "), _text),
    st.tuples(st.just("data:"), _text),
    st.tuples(st.just("data"), st.just("")),
    st.tuples(st.just("event: "), _text),
    st.tuples(st.just(":"), _text),
    st.tuples(st.just("id: "), _text),
    st.tuples(st.just("retry: "), st.from_regex(r"[0-9]{0,4}", fullmatch=True)),
    st.tuples(st.just(""), _text),
    st.tuples(st.just(""), st.just("")),
)
_ending = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(_line, _ending), max_size=30))
    out = BOM if draw(st.booleans()) else b""
    for (field, value), ending in lines:
        out += (field + value).encode() + ending
    if lines and draw(st.booleans()):  # sometimes the stream ends without its last terminator
        out = out.rstrip(b"\r\n")
    return out


@st.composite
def splits(draw: st.DrawFn, strategy: st.SearchStrategy[bytes]) -> tuple[bytes, list[bytes]]:
    data = draw(strategy)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return data, split_at(data, cuts)


@settings(max_examples=400, deadline=None)
@given(splits(sse_streams()))
def test_any_split_of_a_generated_stream_gives_the_reference_events(case: tuple[bytes, list[bytes]]) -> None:
    stream, pieces = case
    expected = reference(stream)
    assert decode([stream]) == expected
    assert decode(pieces) == expected


@settings(max_examples=300, deadline=None)
@given(splits(sse_streams()), st.integers(1, 24))
def test_any_split_with_a_small_event_limit_gives_the_reference_events(
    case: tuple[bytes, list[bytes]], limit: int
) -> None:
    stream, pieces = case
    assert decode(pieces, max_event_bytes=limit) == reference(stream, max_event_bytes=limit)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_random_bytes_never_raise_and_memory_stays_bounded(pieces: list[bytes]) -> None:
    limit = 64
    decoder = SSEDecoder(max_event_bytes=limit)
    events: list[SSEEvent] = []
    for piece in pieces:
        events += decoder.feed(piece)
        assert decoder.pending_bytes <= 2 * limit + 2
    events += decoder.close()
    assert all(len(e.data) <= limit for e in events)
    stream = b"".join(pieces)
    assert events_of(events) == reference(stream, max_event_bytes=limit)
    assert all(0 <= e.start < e.end <= len(stream) for e in events)


# --- cost: each byte is looked at a bounded number of times -----------------------------------------------


class CountingBytes(bytes):
    """bytes that count how many bytes the decoder's searches look at."""

    examined = 0

    def find(self, sub, start=0, *args):  # type: ignore[no-untyped-def, override]
        found = super().find(sub, start, *args)
        CountingBytes.examined += (found + 1 if found != -1 else len(self)) - start
        return found

    def __contains__(self, sub):  # type: ignore[no-untyped-def, override]
        CountingBytes.examined += len(self)
        return super().__contains__(sub)


@pytest.mark.parametrize(("size", "piece"), [(1 << 20, 100), (1 << 16, 1), (1 << 20, 4096)])
def test_a_long_line_in_small_pieces_is_not_rescanned(size: int, piece: int) -> None:
    line = b"data: " + b"x" * size
    decoder = SSEDecoder()
    CountingBytes.examined = 0
    for start in range(0, len(line), piece):
        assert decoder.feed(CountingBytes(line[start : start + piece])) == []
    # Each read is searched once for LF and once for CR; the partial line is never searched again.
    assert CountingBytes.examined <= 2 * len(line)
    assert decoder.pending_bytes == len(line)
    [event] = decoder.feed(b"\n\n")
    assert len(event.data) == size


def _time_line(size: int, piece: int) -> float:
    """Best CPU time of a few runs (CPU time: other processes on the machine barely move it)."""
    line = b"data: " + b"x" * size + b"\n\n"
    chunks = [line[i : i + piece] for i in range(0, len(line), piece)]
    best = float("inf")
    for _ in range(5):
        decoder = SSEDecoder()
        began = time.process_time()
        for chunk in chunks:
            decoder.feed(chunk)
        best = min(best, time.process_time() - began)
    return best


@pytest.mark.parametrize(("small", "piece"), [(1 << 21, 100), (1 << 15, 1)])
def test_time_grows_linearly_with_the_line(small: int, piece: int) -> None:
    # Four times the bytes: about four times the time when linear, sixteen when quadratic.
    gc.disable()
    try:
        ratio = _time_line(4 * small, piece) / _time_line(small, piece)
    finally:
        gc.enable()
    assert ratio < 8, ratio
