"""Streaming end to end: SSE passes through unbuffered and byte-exact, each streamed call is one row.

The pure part drives StreamTap (decoder + folder + usage-chunk removal) with every split of the
realistic streams of tests/stream_payloads.py. The rest runs the proxy on a real port in front of a
scripted upstream (Trickle) that sends a stream in small irregular pieces with small pauses, and
reads it with the official openai client and with raw aiohttp, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from openrouter import OpenRouter

from proxy.parse import stream_bytes
from proxy.parse.chat_stream import StreamFolder
from proxy.parse.record import CompletionRecord
from proxy.parse.stream_tap import MAX_HELD_BYTES, TAIL_BYTES, StreamTap
from proxy.relay import copies as relay_copies
from proxy.store.rows import record_to_row

from .conftest import Ledger, make_config, start_ledger
from .stream_payloads import (
    CASES,
    CUT_OFF_ERROR,
    N2,
    OPENAI_INCLUDE_USAGE,
    OPENAI_LIKE_TEXT,
    OPENAI_LIKE_USAGE,
    OPENROUTER,
    VLLM,
    StreamCase,
    comment_block,
    data_block,
    done_block,
    openai_like,
    vllm_running_usage,
)
from .upstream import FakeUpstream

CHAT = "/v1/chat/completions"
KEY = "sk-test-streaming-0123456789"
REQUEST = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}'
INJECTED = REQUEST[:-1] + b',"stream_options":{"include_usage":true}}'
ROW_KEYS = ("index", "finish_reason", "native_finish_reason", "role")


def case_id(case: StreamCase) -> str:
    return case.name


def new_record() -> CompletionRecord:
    return CompletionRecord("req", datetime.now(UTC), "POST", CHAT, "http://upstream")


def expected_bytes(case: StreamCase, strip: bool) -> bytes:
    return case.proxied_body if strip else case.body


def record_matches(record: CompletionRecord, case: StreamCase) -> None:
    """The folded record against the case's expected row (outcome is decided by the forwarder)."""
    for name, value in case.row.items():
        if name != "outcome":
            assert getattr(record, name) == value, name
    choices = sorted(record.choices, key=lambda c: c.index)
    assert [{k: getattr(c, k) for k in ROW_KEYS} for c in choices] == list(case.choices)


# --- pure: StreamTap at every split point ----------------------------------------------------------------


def run_tap(pieces: list[bytes], strip: bool) -> tuple[bytes, StreamTap]:
    tap = StreamTap(new_record(), None, strip_usage_chunk=strip)
    out = b"".join(tap.feed(piece, float(n)) for n, piece in enumerate(pieces, 1))
    return out + tap.close(float(len(pieces) + 1)), tap


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tap_strips_exactly_the_usage_block_at_every_split_point(case: StreamCase) -> None:
    body = case.body
    want = expected_bytes(case, strip=True)
    for cut in range(len(body) + 1):
        out, tap = run_tap([body[:cut], body[cut:]], strip=True)
        assert out == want, cut
        assert tap.stripped == (case.usage_block is not None)
        record_matches(tap.folder.record, case)
        assert tap.folder.failed == (case.row["outcome"] != "ok")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("strip", [True, False])
def test_tap_in_irregular_pieces(case: StreamCase, strip: bool) -> None:
    body = case.body
    rng = random.Random(case.name)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(1, 60)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        out, tap = run_tap(pieces, strip)
        assert out == expected_bytes(case, strip)
        record_matches(tap.folder.record, case)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("strip", [True, False])
@pytest.mark.parametrize("per_read", [1, 2, 3])
def test_tap_reads_of_whole_events_give_the_same_record(case: StreamCase, strip: bool, per_read: int) -> None:
    """Upstreams usually send whole events per read: the tap then skips the content deltas it needs
    no parse for, and must still produce exactly the record and bytes of a byte-by-byte decode."""
    blocks = case.blocks
    pieces = [b"".join(blocks[i : i + per_read]) for i in range(0, len(blocks), per_read)]
    out, tap = run_tap(pieces, strip)
    assert out == expected_bytes(case, strip)
    record_matches(tap.folder.record, case)
    assert tap.folder.failed == (case.row["outcome"] != "ok")


def test_tap_skips_parsing_plain_content_deltas_once_settled() -> None:
    """A long stream of content deltas is mostly not parsed: only the first chunks and the end."""
    base = {"id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": f"w{n} "}, "finish_reason": None}],
                "usage": None} for n in range(200)]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": None})
    events.append({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 200,
                                                     "total_tokens": 203}})
    blocks = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
    for per_read in (1, 10):
        pieces = [b"".join(blocks[i : i + per_read]) for i in range(0, len(blocks), per_read)]
        out, tap = run_tap(pieces, strip=True)
        record = tap.folder.record
        assert out == b"".join(blocks[:-2] + blocks[-1:])  # the injected usage chunk removed
        assert (record.completion_id, record.prompt_tokens, record.completion_tokens) == ("chatcmpl-long", 3, 200)
        assert [(c.index, c.finish_reason, c.role) for c in record.choices] == [(0, "length", "assistant")]
        assert tap.folder.parsed_events < 15, tap.folder.parsed_events


STARTED = datetime(2026, 1, 1, tzinfo=UTC)


def _payload(block: bytes) -> Any:
    data = block.strip().removeprefix(b"data:").strip()
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _lengthened(case: StreamCase, copies: int, at: int | None = None) -> list[bytes]:
    """The case's blocks with its first content-delta block repeated `copies` times, inserted before
    block `at` (default: right after that block): a long stream of the case's shape."""
    content = next(
        (n for n, chunk in enumerate(case.chunks) if any(
            isinstance(c.get("delta"), dict) and c["delta"].get("content") for c in chunk.get("choices") or ())),
        None,
    )
    blocks = list(case.blocks)
    if content is None:
        return blocks
    block = next((b for b in blocks if _payload(b) == case.chunks[content]), None)
    if block is None:  # multi-line data: the event spans several blocks as split here
        return blocks
    if at is None:
        at = blocks.index(block) + 1
    return blocks[:at] + [block] * copies + blocks[at:]


def _fold(pieces: list[bytes], times: list[float], whole: bool) -> tuple[CompletionRecord, StreamTap]:
    tap = StreamTap(CompletionRecord("req", STARTED, "POST", CHAT, "http://u"), None, strip_usage_chunk=False)
    if whole:
        tap.feed_all(pieces, times)
    else:
        for piece, at in zip(pieces, times, strict=True):
            tap.feed(piece, at)
    tap.close(times[-1] + 1 if times else 0.0)
    return tap.folder.record, tap


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_feed_all_folds_a_captured_stream_as_read_by_read_feeding_does(case: StreamCase) -> None:
    """The writer folds a whole captured stream with feed_all, which skips the settled middle unparsed:
    for long and short variants of every stream, cut anywhere, it must give the same record and times."""
    rng = random.Random(case.name)
    variants = [(copies, None) for copies in (0, 40, 400)]
    variants += [(60, at) for at in range(1, len(case.blocks))]  # the middle holds finishes, usage, errors
    for copies, at in variants:
        body = b"".join(_lengthened(case, copies, at))
        for _ in range(8 if at is None else 3):
            cuts = sorted(rng.sample(range(1, len(body)), rng.randint(1, 40)))
            pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
            times = [float(n) for n in range(1, len(pieces) + 1)]
            whole, whole_tap = _fold(pieces, times, whole=True)
            each, each_tap = _fold(pieces, times, whole=False)
            assert record_to_row(whole) == record_to_row(each), (copies, at, cuts)
            assert (whole_tap.first_event_at, whole_tap.first_content_at) == (
                each_tap.first_event_at, each_tap.first_content_at)
            assert whole_tap.folder.failed == each_tap.folder.failed
            if copies == 0:
                record_matches(whole, case)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_strip_only_tap_cuts_the_same_bytes_as_the_folding_tap(case: StreamCase) -> None:
    """A stream whose usage chunk the proxy cuts is folded by the writer from a raw copy; the tap on the
    request path (strip_only) decodes only reads that could hold that chunk, and must hand the client
    exactly what the full tap does, for long and short streams, in whole events and cut anywhere."""
    rng = random.Random(case.name)
    for copies in (0, 60):
        blocks = _lengthened(case, copies)
        body = b"".join(blocks)
        splits = [[b"".join(blocks[i : i + n]) for i in range(0, len(blocks), n)] for n in (1, 2, 3)]
        for _ in range(10):
            cuts = sorted(rng.sample(range(1, len(body)), rng.randint(1, 40)))
            splits.append([body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)])
        for pieces in splits:
            outputs = []
            for strip_only in (False, True):
                tap = StreamTap(new_record(), None, strip_usage_chunk=True, strip_only=strip_only)
                out = b"".join(tap.feed(piece, float(n)) for n, piece in enumerate(pieces, 1))
                outputs.append((out + tap.close(99.0), tap.stripped))
            assert outputs[1] == outputs[0]
            if copies == 0:
                assert outputs[1][0] == case.proxied_body


def test_feed_all_parses_only_the_end_of_a_long_settled_stream() -> None:
    body = b"".join(_lengthened(OPENAI_INCLUDE_USAGE, 500))
    cut_pieces = [body[start : start + 901] for start in range(0, len(body), 901)]  # reads cut events in two
    record, tap = _fold(cut_pieces, [float(n) for n in range(len(cut_pieces))], whole=True)
    record_matches(record, OPENAI_INCLUDE_USAGE)
    assert tap.folder.parsed_events < 40, tap.folder.parsed_events


def _tail_events(blocks: list[bytes]) -> int:
    """How many events the last TAIL_BYTES (and a block) of a stream hold: what feed_all may parse."""
    return b"".join(blocks)[-TAIL_BYTES - max(map(len, blocks)) :].count(b"\n\n")


def test_feed_all_parses_a_read_of_many_events_only_up_to_the_event_that_settles_the_fold() -> None:
    """Upstreams write several events at once, so a read holds ten or more. The writer must not parse a
    whole first read: the role chunk and the first content chunk settle the fold, the rest is skippable."""
    blocks = _lengthened(OPENAI_INCLUDE_USAGE, 500)
    for per_read in (3, 10, 40):
        pieces = [b"".join(blocks[i : i + per_read]) for i in range(0, len(blocks), per_read)]
        record, tap = _fold(pieces, [float(n) for n in range(len(pieces))], whole=True)
        record_matches(record, OPENAI_INCLUDE_USAGE)
        tail_events = _tail_events(blocks)
        assert tap.folder.parsed_events <= 2 + tail_events, (per_read, tap.folder.parsed_events)
        assert tap.first_content_at == 0.0


def test_feed_all_parses_a_usual_stream_only_from_its_last_content_chunk() -> None:
    """A long stream whose deltas differ only in their content: past the chunks that settle the fold,
    only the last content chunk, the finish and the usage chunk are parsed."""
    role, content = OPENAI_INCLUDE_USAGE.blocks[0], OPENAI_INCLUDE_USAGE.blocks[1]
    words = [f"w{n}".encode() for n in range(300)]
    deltas = [content.replace(b'"content":"The"', b'"content":"' + word + b'"') for word in words]
    deltas = [d.replace(b'"obfuscation":""', b'"obfuscation":"Qm"') for d in deltas]  # one shape
    blocks = [role, *deltas, *OPENAI_INCLUDE_USAGE.blocks[-3:]]  # finish, usage, [DONE]
    pieces = [b"".join(blocks[i : i + 10]) for i in range(0, len(blocks), 10)]
    record, tap = _fold(pieces, [float(n) for n in range(len(pieces))], whole=True)
    assert [choice.finish_reason for choice in record.choices] == ["stop"]
    assert record.completion_tokens == OPENAI_INCLUDE_USAGE.row["completion_tokens"]
    assert tap.folder.parsed_events == 5  # role, first content; last content, finish, usage


def test_feed_all_skips_the_middle_of_a_stream_with_openai_obfuscation_strings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenAI pads every chunk with an `obfuscation` string of random length: the middle is still proven
    quiet (with those strings emptied) instead of going to the slower marker search or being parsed."""
    role, content = OPENAI_INCLUDE_USAGE.blocks[0], OPENAI_INCLUDE_USAGE.blocks[1]
    rng = random.Random(5)
    deltas = [
        content.replace(b'"content":"The"', b'"content":"w%d"' % n).replace(
            b'"obfuscation":""', b'"obfuscation":"' + b"x" * rng.randint(0, 12) + b'"'
        )
        for n in range(300)
    ]
    blocks = [role, *deltas, *OPENAI_INCLUDE_USAGE.blocks[-3:]]
    pieces = [b"".join(blocks[i : i + 10]) for i in range(0, len(blocks), 10)]
    marker_searches = []
    monkeypatch.setattr(stream_bytes, "chunk_may_matter", lambda data: marker_searches.append(data) or True)
    record, tap = _fold(pieces, [float(n) for n in range(len(pieces))], whole=True)
    assert marker_searches == []
    assert record.completion_tokens == OPENAI_INCLUDE_USAGE.row["completion_tokens"]
    assert [choice.finish_reason for choice in record.choices] == ["stop"]
    tail_events = _tail_events(blocks)
    assert tap.folder.parsed_events <= 2 + tail_events
    assert len({block[-20:] for block in deltas}) > 10  # the strings do differ


def test_tap_passthrough_returns_each_read_as_is() -> None:
    body = OPENAI_INCLUDE_USAGE.body
    tap = StreamTap(new_record(), None, strip_usage_chunk=False)
    for start in range(0, len(body), 13):
        piece = body[start : start + 13]
        assert tap.feed(piece, 1.0) is piece
    assert tap.close(2.0) == b""


def test_tap_releases_an_event_the_moment_it_is_complete_when_stripping() -> None:
    first, second = OPENAI_INCLUDE_USAGE.blocks[:2]
    tap = StreamTap(new_record(), None, strip_usage_chunk=True)
    assert tap.feed(first[:-1], 1.0) == b""  # the blank line has not arrived: the event may still go
    assert tap.feed(first[-1:] + second[:5], 2.0) == first
    assert tap.feed(second[5:], 3.0) == second  # held until complete, then released whole


def test_ttft_is_the_first_event_with_content_not_a_comment_or_the_role_chunk() -> None:
    case = OPENROUTER  # 3 comments, 2 reasoning chunks, a comment, content...
    tap = StreamTap(new_record(), None, strip_usage_chunk=False)
    for n, block in enumerate(case.blocks, 1):
        tap.feed(block, float(n))
    assert tap.first_content_at == 4.0  # the first reasoning delta (blocks 1-3 are comments)
    tap = StreamTap(new_record(), None, strip_usage_chunk=False)
    for n, block in enumerate(OPENAI_INCLUDE_USAGE.blocks, 1):
        tap.feed(block, float(n))
    assert tap.first_event_at == 1.0
    assert tap.first_content_at == 2.0  # block 1 is the role chunk with content ""


def test_gzip_stream_is_folded_and_passed_on_compressed() -> None:
    case = OPENROUTER
    compressed = gzip.compress(case.body)
    tap = StreamTap(new_record(), "gzip", strip_usage_chunk=True)
    assert not tap.stripping  # compressed bytes cannot be cut: usage chunk stays
    out = b"".join(tap.feed(compressed[i : i + 50], 1.0) for i in range(0, len(compressed), 50))
    assert out + tap.close(2.0) == compressed
    record_matches(tap.folder.record, case)


@pytest.mark.parametrize("strip", [True, False])
def test_a_usage_chunk_after_done_is_still_logged_and_never_parsed_as_content(strip: bool) -> None:
    case = OPENAI_INCLUDE_USAGE
    blocks = list(case.blocks)
    usage, done = blocks[case.usage_block], blocks[-1]
    late = [
        *blocks[: case.usage_block],
        done,
        usage,
        data_block({"choices": [{"index": 0, "finish_reason": "x"}]}),
    ]
    body = b"".join(late)
    out, tap = run_tap([body[i : i + 9] for i in range(0, len(body), 9)], strip)
    assert out == (body.replace(usage, b"") if strip else body)
    record = tap.folder.record
    assert record.total_tokens == case.row["total_tokens"]
    assert [c.finish_reason for c in record.choices] == ["stop"]  # the completion ended at [DONE]


def test_an_unreadable_stream_passes_through_and_is_not_taken_for_finished() -> None:
    body = OPENAI_INCLUDE_USAGE.body
    tap = StreamTap(new_record(), "zstd-unknown", strip_usage_chunk=True)
    assert not tap.stripping
    assert tap.feed(body, 1.0) is body
    assert not tap.folder.done  # a hang-up now is a disconnect, not "after [DONE]"
    assert tap.close(2.0) == b""
    assert tap.folder.parsed_events == 0


def test_an_event_too_big_to_hold_stops_stripping_but_loses_no_byte() -> None:
    big = data_block({"choices": [{"index": 0, "delta": {"content": "x" * (MAX_HELD_BYTES + 100_000)}}]})
    body = big + b"".join(OPENAI_INCLUDE_USAGE.blocks)
    out, tap = run_tap([body[i : i + 65536] for i in range(0, len(body), 65536)], strip=True)
    assert out == body
    assert not tap.stripping


def test_folder_takes_the_last_running_usage_never_the_sum() -> None:
    chunks = VLLM.chunks[:-1]  # without the final usage-only chunk: the finish chunk's running usage wins
    folder = StreamFolder(new_record())
    for chunk in chunks:
        folder.feed(orjson.dumps(chunk))
    folder.finish(at_eof=True)
    last = vllm_running_usage(len(chunks))
    assert (folder.record.prompt_tokens, folder.record.completion_tokens) == (
        last["prompt_tokens"],
        last["completion_tokens"],
    )
    assert folder.record.completion_tokens < sum(c["usage"]["completion_tokens"] for c in chunks)


def test_folder_keeps_the_first_finish_reason_state_through_a_duplicate_finish_chunk() -> None:
    chunks = list(OPENROUTER.chunks)
    finish = chunks[-2]
    duplicate = {**finish, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]}
    folder = StreamFolder(new_record())
    for chunk in [*chunks[:-1], duplicate, chunks[-1]]:
        folder.feed(orjson.dumps(chunk))
    folder.finish(at_eof=True)
    [choice] = folder.record.choices
    assert (choice.finish_reason, choice.native_finish_reason) == ("stop", "end_turn")


def test_folder_cut_off_only_at_a_clean_end_without_done_or_finish() -> None:
    for at_eof, done, expected in [(True, False, CUT_OFF_ERROR), (False, False, None), (True, True, None)]:
        folder = StreamFolder(new_record())
        for chunk in OPENAI_INCLUDE_USAGE.chunks[:3]:
            folder.feed(orjson.dumps(chunk))
        if done:
            folder.feed(b"[DONE]")
        folder.finish(at_eof=at_eof)
        assert folder.record.error == expected
        assert folder.failed == (expected is not None)


# --- the scripted upstream ----------------------------------------------------------------------------

DELAYS = (0.0, 0.0, 0.0, 0.001, 0.003)


@dataclass
class Trickle:
    """Sends an SSE body in small irregular pieces with small irregular pauses, and notes what happened.

    body may be a function of the request body (an upstream that answers what was asked).
    pause_at/pause: wait there before going on; cut_at: drop the connection there;
    hang_at: stop there and keep the connection open.
    """

    body: bytes | Callable[[bytes], bytes]
    seed: int = 1
    max_piece: int = 48
    pause_at: int | None = None
    pause: float = 0.0
    cut_at: int | None = None
    hang_at: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    received: list[bytes] = field(default_factory=list)
    sent: int = 0
    finished_at: float | None = None
    gone: str | None = None
    gone_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: web.Request, body: bytes) -> web.StreamResponse:
        self.received.append(body)
        data = self.body(body) if callable(self.body) else self.body
        response = web.StreamResponse(headers={"Cache-Control": "no-cache", **self.headers})
        response.content_type = "text/event-stream"
        rng = random.Random(self.seed)
        stops = [p for p in (self.pause_at, self.cut_at, self.hang_at) if p is not None]
        try:
            await response.prepare(request)
            position = 0
            while position < len(data) or position == self.hang_at:
                if position < len(data):
                    end = min(
                        [
                            position + rng.randint(1, self.max_piece),
                            len(data),
                            *(s for s in stops if s > position),
                        ]
                    )
                    await response.write(data[position:end])
                    position = self.sent = end
                if position == self.pause_at:
                    self.pause_at = None
                    await asyncio.sleep(self.pause)
                if position == self.cut_at:
                    await asyncio.sleep(0.02)
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if position == self.hang_at:
                    await asyncio.sleep(3600)
                delay = rng.choice(DELAYS)
                if delay:
                    await asyncio.sleep(delay)
            await response.write_eof()
            self.finished_at = time.perf_counter()
        except asyncio.CancelledError:
            self._went("cancelled")
            raise
        except ConnectionError:
            self._went("write failed")
            raise
        return response

    def _went(self, how: str) -> None:
        self.gone = how
        self.gone_event.set()


def add(upstream: FakeUpstream, trickle: Trickle, name: str = "t") -> Trickle:
    upstream.add(name, trickle)
    return trickle


@dataclass
class Raw:
    status: int
    headers: Any
    data: bytes
    error: Exception | None


async def raw_call(
    url: str, body: bytes = REQUEST, scenario: str = "t", *, until: bytes | None = None, path: str = CHAT
) -> Raw:
    """POST and read the stream as bytes; with `until`, hang up as soon as those bytes arrived."""
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {KEY}",
        "X-Fake-Scenario": scenario,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + path, data=body, headers=headers) as resp,
    ):
        data = bytearray()
        error: Exception | None = None
        try:
            async for piece in resp.content.iter_any():
                data += piece
                if until is not None and until in data:
                    resp.close()
                    break
        except aiohttp.ClientPayloadError as exc:
            error = exc
        return Raw(resp.status, resp.headers, bytes(data), error)


def openai_client(ledger: Ledger, scenario: str = "t") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=ledger.url + "/v1", api_key=KEY, max_retries=0, default_headers={"X-Fake-Scenario": scenario}
    )


async def openai_chunks(
    ledger: Ledger, scenario: str = "t", **kwargs: Any
) -> tuple[list[Any], Exception | None]:
    """Stream through the official client; returns the chunks it yielded and the error it raised, if any."""
    chunks: list[Any] = []
    error: Exception | None = None
    async with openai_client(ledger, scenario) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, **kwargs
        )
        try:
            async for chunk in stream:
                chunks.append(chunk)
        except Exception as exc:  # the stream's failure is what some tests look at
            error = exc
        await stream.close()
    return chunks, error


def check_row(row: dict[str, Any], case: StreamCase) -> None:
    for name, value in case.row.items():
        assert row[name] == value, name
    assert [{k: c[k] for k in ROW_KEYS} for c in row["choices"]] == list(case.choices)
    assert row["stream"] is True
    assert row["status_code"] == 200
    assert row["requested_model"] == "gpt-4o-mini"
    assert 0 < row["ttft_ms"] <= row["duration_ms"]


async def wait_for(event: asyncio.Event) -> None:
    async with asyncio.timeout(3):
        await event.wait()


# --- every realistic stream, through both kinds of client ------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
async def test_stream_end_to_end(case: StreamCase, ledger: Ledger, upstream: FakeUpstream) -> None:
    trickle = add(upstream, Trickle(case.body, seed=len(case.body)))

    chunks, error = await openai_chunks(ledger)
    raw = await raw_call(ledger.url)

    # (a) the official client: every chunk as sent, no usage-only chunk it did not ask for.
    assert [c.to_dict() for c in chunks] == case.client_chunks
    if case.client_error is None:
        assert error is None
    else:
        assert isinstance(error, openai.APIError)
        assert error.message == case.client_error
    text: dict[int, str] = {}
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            text[choice.index] = text.get(choice.index, "") + (choice.delta.content or "")
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, ["", ""])
                entry[0] += call.function.name or ""
                entry[1] += call.function.arguments or ""
    assert {i: t for i, t in text.items() if t} == case.text
    assert {i: (n, a) for i, (n, a) in calls.items()} == case.tool_calls

    # (b) raw HTTP: the upstream's bytes, minus the usage chunk the proxy asked for on the client's behalf.
    assert raw.status == 200
    assert raw.error is None
    assert raw.headers["Content-Type"] == "text/event-stream"
    assert raw.data == case.proxied_body

    # Both requests went upstream with include_usage added, the rest of the body untouched.
    assert trickle.received[1] == INJECTED
    assert orjson.loads(trickle.received[0])["stream_options"] == {"include_usage": True}

    rows = await ledger.rows()
    assert len(rows) == 2
    for row in rows:
        check_row(row, case)
    assert rows[1]["request_id"] == raw.headers["X-Ledger-Request-Id"]


# --- no buffering, time to first token -------------------------------------------------------------------


@pytest.mark.parametrize("asks_usage", [False, True], ids=["stripping", "passthrough"])
async def test_first_event_reaches_the_client_while_the_upstream_is_paused(
    ledger: Ledger, upstream: FakeUpstream, asks_usage: bool
) -> None:
    case = OPENAI_INCLUDE_USAGE
    first = case.blocks[0]
    trickle = add(upstream, Trickle(case.body, pause_at=len(first), pause=0.6))
    body = INJECTED if asks_usage else REQUEST
    headers = {"Content-Type": "application/json", "X-Fake-Scenario": "t"}
    began = time.perf_counter()
    async with (
        aiohttp.ClientSession() as session,
        session.post(ledger.url + CHAT, data=body, headers=headers) as r,
    ):
        data = bytearray()
        while first not in data:
            data += await r.content.readany()
        got_first = time.perf_counter()
        # The upstream has sent the first event only and is still waiting.
        assert trickle.sent == len(first)
        assert trickle.finished_at is None
        data += await r.content.read()
    assert trickle.finished_at is not None
    assert got_first - began < 0.4
    assert trickle.finished_at - began >= 0.6
    assert bytes(data) == (case.body if asks_usage else case.proxied_body)
    row = await ledger.row()
    assert row["outcome"] == "ok"
    assert row["duration_ms"] >= 600


async def test_openai_client_gets_the_first_chunk_while_the_upstream_is_paused(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    case = OPENAI_INCLUDE_USAGE
    trickle = add(upstream, Trickle(case.body, pause_at=len(case.blocks[0]), pause=0.5))
    async with openai_client(ledger) as client:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[], stream=True)
        first = await stream.__anext__()
        assert first.choices[0].delta.role == "assistant"
        assert trickle.sent == len(case.blocks[0])
        assert trickle.finished_at is None
        rest = [chunk async for chunk in stream]
    assert len(rest) == len(case.client_chunks) - 1
    assert trickle.finished_at is not None


async def test_ttft_waits_for_content_not_for_keepalives_or_the_role_chunk(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    case = OPENROUTER  # three processing comments, then reasoning deltas
    comments = b"".join(case.blocks[:3])
    trickle = add(upstream, Trickle(case.body, pause_at=len(comments), pause=0.3))
    raw = await raw_call(ledger.url)
    assert raw.data == case.proxied_body
    row = await ledger.row()
    assert 300 <= row["ttft_ms"] <= row["duration_ms"]
    assert trickle.finished_at is not None

    role_only = OPENAI_INCLUDE_USAGE  # first event: the role chunk, no content yet
    add(upstream, Trickle(role_only.body, pause_at=len(role_only.blocks[0]), pause=0.3), "role")
    began = time.perf_counter()
    await raw_call(ledger.url, scenario="role")
    elapsed_ms = (time.perf_counter() - began) * 1000
    row = (await ledger.rows())[1]
    assert 300 <= row["ttft_ms"] <= row["duration_ms"] <= elapsed_ms


# --- usage injection ------------------------------------------------------------------------------------


def answer_like_openai(request_body: bytes) -> bytes:
    """An OpenAI upstream sends the usage-only chunk only when the request asked for it."""
    options = orjson.loads(request_body).get("stream_options") or {}
    return openai_like(usage=options.get("include_usage") is True)


async def test_usage_is_injected_then_its_chunk_removed_from_the_raw_stream(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    trickle = add(upstream, Trickle(answer_like_openai))
    raw = await raw_call(ledger.url, REQUEST)
    assert trickle.received == [INJECTED]
    # The usage-only chunk is gone; the other chunks keep their "usage":null (bytes are never rewritten).
    assert raw.data == OPENAI_INCLUDE_USAGE.proxied_body
    row = await ledger.row()
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        OPENAI_LIKE_USAGE["prompt_tokens"],
        OPENAI_LIKE_USAGE["completion_tokens"],
        OPENAI_LIKE_USAGE["total_tokens"],
    )
    assert row["cached_tokens"] == OPENAI_LIKE_USAGE["prompt_tokens_details"]["cached_tokens"]
    assert row["usage"] == OPENAI_LIKE_USAGE


async def test_openai_client_never_sees_the_injected_usage_chunk(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    trickle = add(upstream, Trickle(answer_like_openai))
    chunks, error = await openai_chunks(ledger)
    assert error is None
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == OPENAI_LIKE_TEXT
    assert orjson.loads(trickle.received[0])["stream_options"] == {"include_usage": True}
    row = await ledger.row()
    assert row["total_tokens"] == OPENAI_LIKE_USAGE["total_tokens"]
    assert row["outcome"] == "ok"


async def test_a_stream_over_the_copy_limit_is_still_logged_from_its_head_and_tail(
    ledger: Ledger, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_PARSED_BODY, a stream's copy keeps only its first and its last reads (the middle of a
    huge stream is content deltas): the row still gets the stream's ids, finish reason and usage, here
    from the usage chunk the proxy asked for and cut out of what the official client gets."""
    monkeypatch.setattr(relay_copies, "MAX_PARSED_BODY", 32 * 1024)
    monkeypatch.setattr(relay_copies, "STREAM_HEAD_BYTES", 4 * 1024)
    monkeypatch.setattr(relay_copies, "STREAM_TAIL_BYTES", 8 * 1024)
    case = OPENAI_INCLUDE_USAGE
    body = b"".join(_lengthened(case, 1500))
    assert len(body) > 200 * 1024
    add(upstream, Trickle(body, max_piece=997))
    chunks, error = await openai_chunks(ledger)
    assert error is None
    assert len(chunks) == len(case.client_chunks) + 1500
    assert all(chunk.usage is None for chunk in chunks)
    check_row(await ledger.row(), case)


async def test_openai_client_that_asked_for_usage_gets_the_usage_chunk(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    add(upstream, Trickle(answer_like_openai))
    chunks, error = await openai_chunks(ledger, stream_options={"include_usage": True})
    assert error is None
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == OPENAI_LIKE_USAGE["total_tokens"]
    assert (await ledger.row())["total_tokens"] == OPENAI_LIKE_USAGE["total_tokens"]


@pytest.mark.parametrize(
    "request_body",
    [
        b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}',
        b'{ "model": "anthropic/claude-sonnet-4",\n  "stream": true,\n  "usage": {"include": true},'
        b' "messages": [] }\n',
    ],
    ids=["stream_options", "openrouter_usage_include"],
)
async def test_a_request_that_asked_for_usage_is_forwarded_and_answered_untouched(
    ledger: Ledger, upstream: FakeUpstream, request_body: bytes
) -> None:
    case = OPENAI_INCLUDE_USAGE
    trickle = add(upstream, Trickle(case.body))
    raw = await raw_call(ledger.url, request_body)
    assert trickle.received == [request_body]
    assert raw.data == case.body  # usage chunk included
    row = await ledger.row()
    assert row["total_tokens"] == case.row["total_tokens"]
    assert row["outcome"] == "ok"


async def test_openrouter_usage_chunk_reaches_its_client_though_the_proxy_asked(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    """OpenRouter sends usage unasked; the OpenRouter SDK through the proxy sees what it sees without it."""
    case = OPENROUTER
    trickle = add(upstream, Trickle(case.body))
    async with OpenRouter(api_key=KEY, server_url=ledger.url + "/api/v1") as client:
        response = await client.chat.send_async(
            model="anthropic/claude-sonnet-4",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            http_headers={"X-Fake-Scenario": "t"},
        )
        async with response as events:
            chunks = [chunk async for chunk in events]
    assert orjson.loads(trickle.received[0])["stream_options"] == {"include_usage": True}
    assert len(chunks) == len(case.chunks)
    assert chunks[-1].usage.cost == case.chunks[-1]["usage"]["cost"]
    row = await ledger.row()
    assert row["path"] == "/api/v1/chat/completions"
    for name, value in case.row.items():
        assert row[name] == value, name


async def test_injection_can_be_turned_off(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> None:
    config = make_config(upstream.url, database_url, tmp_path, logging={"inject_stream_usage": False})
    ledger = await start_ledger(config)
    try:
        trickle = add(upstream, Trickle(answer_like_openai))
        raw = await raw_call(ledger.url, REQUEST)
        assert trickle.received == [REQUEST]
        assert raw.data == openai_like(usage=False)
        row = await ledger.row()
    finally:
        await ledger.stop()
    assert row["outcome"] == "ok"
    # No usage arrived: unknown, not zero.
    for name in (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost",
        "cost_source",
        "usage",
    ):
        assert row[name] is None, name


# --- failures inside a stream -----------------------------------------------------------------------------


async def test_upstream_connection_dropped_mid_stream(ledger: Ledger, upstream: FakeUpstream) -> None:
    case = OPENAI_INCLUDE_USAGE
    seen = 4  # role chunk and three words arrive whole, then the fifth event is cut in its middle
    cut = len(b"".join(case.blocks[:seen])) + len(case.blocks[seen]) // 2
    add(upstream, Trickle(case.body, cut_at=cut))

    raw = await raw_call(ledger.url)
    assert isinstance(raw.error, aiohttp.ClientPayloadError)  # a truncated response, not a complete one
    assert raw.data == case.body[:cut]

    chunks, error = await openai_chunks(ledger)
    assert error is not None
    assert [c.to_dict() for c in chunks] == list(case.chunks[:seen])

    for row in await ledger.rows():
        assert row["outcome"] == "upstream_error"
        assert row["error"].startswith("upstream connection lost mid-response")
        assert (row["completion_id"], row["model"]) == (case.row["completion_id"], case.row["model"])
        assert [{k: c[k] for k in ROW_KEYS} for c in row["choices"]] == [
            {"index": 0, "finish_reason": None, "native_finish_reason": None, "role": "assistant"}
        ]
        assert row["total_tokens"] is None
        assert row["cost"] is None
        assert 0 < row["ttft_ms"] <= row["duration_ms"]


@pytest.mark.parametrize(
    ("case", "seen", "finishes", "usage"),
    [
        (VLLM, 3, [None], vllm_running_usage(3)),
        (N2, 6, [None, "length"], None),
    ],
    ids=["vllm_running_usage", "n2_one_choice_finished"],
)
async def test_client_disconnect_closes_the_upstream_and_logs_what_was_seen(
    ledger: Ledger,
    upstream: FakeUpstream,
    case: StreamCase,
    seen: int,
    finishes: list[str | None],
    usage: dict[str, int] | None,
) -> None:
    sent = b"".join(case.blocks[:seen])
    trickle = add(upstream, Trickle(case.body, hang_at=len(sent)))
    raw = await raw_call(ledger.url, until=sent)
    assert raw.data == sent
    await wait_for(trickle.gone_event)  # the proxy hung up on the upstream too
    assert trickle.gone == "cancelled"
    row = await ledger.row()
    assert row["outcome"] == "client_disconnected"
    assert row["error"] == "client disconnected"
    assert [c["finish_reason"] for c in row["choices"]] == finishes
    assert row["usage"] == usage
    if usage is not None:
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
    assert row["completion_id"] == case.row["completion_id"]


async def test_client_disconnect_on_an_unreadable_stream_is_a_disconnect(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    case = OPENAI_INCLUDE_USAGE
    sent = b"".join(case.blocks[:3])
    trickle = add(upstream, Trickle(case.body, hang_at=len(sent), headers={"Content-Encoding": "x-unknown"}))
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(ledger.url + CHAT, data=REQUEST, headers={"X-Fake-Scenario": "t"}) as response,
    ):
        data = bytearray()
        while sent not in data:
            data += await response.content.readany()
        response.close()
    await wait_for(trickle.gone_event)
    row = await ledger.row()
    assert row["outcome"] == "client_disconnected"


async def test_client_closing_right_after_done_is_not_a_disconnect(
    ledger: Ledger, upstream: FakeUpstream
) -> None:
    case = OPENAI_INCLUDE_USAGE
    trickle = add(upstream, Trickle(case.body, hang_at=len(case.body)))  # [DONE] sent, EOF never comes
    raw = await raw_call(ledger.url, until=done_block())
    assert raw.data == case.proxied_body
    await wait_for(trickle.gone_event)
    row = await ledger.row()
    check_row(row, case)


async def test_upstream_read_timeout_between_events(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    case = OPENAI_INCLUDE_USAGE
    sent = len(b"".join(case.blocks[:3]))
    trickle = add(upstream, Trickle(case.body, hang_at=sent))
    ledger = await start_ledger(
        make_config(upstream.url, database_url, tmp_path, upstream={"read_timeout": 0.3})
    )
    try:
        began = time.perf_counter()
        raw = await raw_call(ledger.url)
        elapsed = time.perf_counter() - began
        await wait_for(trickle.gone_event)
        row = await ledger.row()
    finally:
        await ledger.stop()
    assert isinstance(raw.error, aiohttp.ClientPayloadError)
    assert raw.data == case.body[:sent]
    assert 0.3 <= elapsed < 2.0
    assert row["outcome"] == "timeout"
    assert row["error"] == "upstream read timed out mid-response"
    assert row["completion_id"] == case.row["completion_id"]
    assert row["total_tokens"] is None
    assert row["duration_ms"] >= 300


async def test_keepalive_comments_keep_a_slow_stream_inside_the_read_timeout(
    upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    """Comments are bytes on the wire: an upstream that sends them is alive, even with no token yet."""
    case = OPENAI_INCLUDE_USAGE
    keepalive = comment_block(b" OPENROUTER PROCESSING")

    async def slow(request: web.Request, _body: bytes) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "text/event-stream"
        await response.prepare(request)
        for _ in range(4):
            await response.write(keepalive)
            await asyncio.sleep(0.15)
        await response.write(case.body)
        await response.write_eof()
        return response

    upstream.add("t", slow)
    ledger = await start_ledger(
        make_config(upstream.url, database_url, tmp_path, upstream={"read_timeout": 0.3})
    )
    try:
        raw = await raw_call(ledger.url)
        row = await ledger.row()
    finally:
        await ledger.stop()
    assert raw.data == keepalive * 4 + case.proxied_body
    assert row["outcome"] == "ok"
    assert row["ttft_ms"] >= 600


def test_strip_only_tap_decodes_only_the_first_event_and_the_end_of_a_long_stream() -> None:
    """The request path's share of a stream whose usage chunk is cut: the first event (the provider that
    would spare the chunk), then only blocks that may hold an empty array."""
    blocks = _lengthened(OPENAI_INCLUDE_USAGE, 500)
    for per_read in (1, 10, 600):
        reads = [b"".join(blocks[i : i + per_read]) for i in range(0, len(blocks), per_read)]
        folding = StreamTap(new_record(), None, strip_usage_chunk=True)
        expected = b"".join(folding.feed(read, 1.0) for read in reads) + folding.close(2.0)
        tap = StreamTap(new_record(), None, strip_usage_chunk=True, strip_only=True)
        assert b"".join(tap.feed(read, 1.0) for read in reads) + tap.close(2.0) == expected
        assert tap.stripped == folding.stripped == 1
        assert tap.folder.data_events <= 2, (per_read, tap.folder.data_events)
