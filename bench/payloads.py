"""Fixed, realistic bodies for the benchmark: one chat request, one ChatCompletion, one 200-event stream,
and the same answer streamed by the Responses API and by Anthropic Messages.

Shaped after OpenAI's wire format (see shared/reference/wire-formats.md). Built once at import: the
upstream must spend no time on them.
"""

from __future__ import annotations

from typing import Any

import orjson

STREAM_EVENTS = 200  # JSON events per streamed completion: role, 197 content deltas, finish, usage
MODEL = "gpt-4o-2024-08-06"
COMPLETION_ID = "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
CREATED = 1741570283
FINGERPRINT = "fp_fc9f1d7035"

_ANSWER = " ".join(
    (
        "The sky looks blue because of Rayleigh scattering. Sunlight contains every visible wavelength,",
        "and as it passes through the atmosphere it meets nitrogen and oxygen molecules that are much",
        "smaller than the wavelength of the light. Such small particles scatter short wavelengths far",
        "more strongly than long ones: the intensity goes as one over the fourth power of the wavelength,",
        "so blue light at 450 nm is scattered about five times more than red light at 700 nm. That",
        "scattered blue light reaches your eyes from every direction of the sky. Violet is scattered even",
        "more, but the Sun emits less of it, some is absorbed high in the atmosphere, and our eyes are less",
        "sensitive to it, so the sky looks blue rather than violet. At sunrise and sunset the light crosses",
        "much more air, most of the blue is scattered away before it reaches you, and the reds and oranges",
        "remain.",
    )
)

USAGE: dict[str, Any] = {
    "prompt_tokens": 412,
    "completion_tokens": 198,
    "total_tokens": 610,
    "prompt_tokens_details": {"cached_tokens": 256, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}

COMPLETION: dict[str, Any] = {
    "id": COMPLETION_ID,
    "object": "chat.completion",
    "created": CREATED,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": _ANSWER, "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
    "service_tier": "default",
    "system_fingerprint": FINGERPRINT,
}
COMPLETION_BODY = orjson.dumps(COMPLETION)

_MESSAGES = [
    {
        "role": "system",
        "content": (
            "You are a patient physics tutor. Explain phenomena from first principles, give the key equation "
            "when there is one, keep answers under 200 words, and end with a one-sentence summary."
        ),
    },
    {"role": "user", "content": "Why is the sky blue? And why is it red at sunset?"},
]


def request_body(stream: bool, include_usage: bool = True) -> bytes:
    """A typical SDK request. A streaming one asks for usage, as the OpenAI SDK does when told to; with
    include_usage=False it is the SDK's default, and chatledger adds the option and cuts the usage chunk."""
    body: dict[str, Any] = {"model": "gpt-4o", "messages": _MESSAGES, "temperature": 0.7, "max_tokens": 400}
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def _tokens(count: int) -> list[str]:
    words = _ANSWER.split(" ")
    return [(" " if i else "") + words[i % len(words)] for i in range(count)]


def _chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None, fingerprint: str) -> bytes:
    chunk = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


_PAD = b"qZ3vXk9LmPa0w"
STAMP = "fp_t0000000000000000000"  # placeholder replaced by the send time in paced mode (same length)


def stream_events(fingerprint: str = FINGERPRINT, obfuscation: bool = False) -> list[bytes]:
    """The STREAM_EVENTS SSE events of one completion, then `data: [DONE]` (STREAM_EVENTS + 1 items).

    obfuscation: every chunk ends with an `obfuscation` string of 0-12 characters, as OpenAI sends them
    unless the request has `stream_options.include_obfuscation: false` (fixed lengths: the bytes repeat)."""
    events = [
        _chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            None,
            fingerprint,
        )
    ]
    for token in _tokens(STREAM_EVENTS - 3):
        events.append(
            _chunk(
                [{"index": 0, "delta": {"content": token}, "logprobs": None, "finish_reason": None}],
                None,
                fingerprint,
            )
        )
    events.append(
        _chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], None, fingerprint)
    )
    events.append(_chunk([], USAGE, fingerprint))
    if obfuscation:  # OpenAI's padding: a string of random length, last in the chunk
        events = [event[:-3] + b',"obfuscation":"%s"}\n\n' % _PAD[: (7 * n) % 13] for n, event in enumerate(events)]
    events.append(b"data: [DONE]\n\n")
    return events


STREAM_EVENT_BYTES = stream_events()
STAMPED_EVENT_BYTES = stream_events(STAMP)


# ---- the other APIs' streams: OpenAI Responses and Anthropic Messages ------------------------------
# The same answer in their wire formats (see shared/reference/wire-formats.md): named events, each with an
# `event:` line, usage in the terminal event, no [DONE]. In paced mode each content delta carries the
# send-time STAMP (Responses: its `obfuscation` string; Messages: the start of its text).

RESPONSE_ID = "resp_68af0d3e5b8c8193a1c2d4e6f8091a2b0c3d4e5f6a7b8c9d"
MESSAGE_ID = "msg_01XFDUDYJgAACzvnptvVoYEL"
DELTAS = STREAM_EVENTS - 3  # content deltas per stream, as in the chat stream
RESPONSES_USAGE: dict[str, Any] = {
    "input_tokens": 412,
    "input_tokens_details": {"cached_tokens": 256, "cache_write_tokens": 0},
    "output_tokens": 198,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 610,
}


def _named(data: dict[str, Any]) -> bytes:
    return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _response(status: str, text: str | None) -> dict[str, Any]:
    output = []
    if text is not None:
        output = [
            {
                "id": "msg_68af0d40a1b48193b2c3d4e5f6a7b8c9",
                "type": "message",
                "status": "completed",
                "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
                "role": "assistant",
            }
        ]
    return {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "model": MODEL,
        "output": output,
        "service_tier": "default",
        "usage": RESPONSES_USAGE if status == "completed" else None,
    }


def responses_events(stamp: str | None = None) -> list[bytes]:
    """A streamed Response: created, in_progress, item and part added, DELTAS text deltas, the done
    events (each repeating the text) and response.completed with usage."""
    tokens = _tokens(DELTAS)
    text = "".join(tokens)
    item_id = "msg_68af0d40a1b48193b2c3d4e5f6a7b8c9"
    item = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response("in_progress", None)},
        {"type": "response.in_progress", "response": _response("in_progress", None)},
        {"type": "response.output_item.added", "output_index": 0, "item": {"id": item_id, "type": "message"}},
        {"type": "response.content_part.added", **item, "part": {"type": "output_text", "text": ""}},
    ]
    for n, token in enumerate(tokens):
        padding = stamp if stamp is not None else _PAD[: (7 * n) % 13].decode()
        events.append(
            {"type": "response.output_text.delta", **item, "delta": token, "logprobs": [], "obfuscation": padding}
        )
    events += [
        {"type": "response.output_text.done", **item, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **item, "part": {"type": "output_text", "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": _response("completed", text)["output"][0]},
        {"type": "response.completed", "response": _response("completed", text)},
    ]
    return [_named({**event, "sequence_number": n}) for n, event in enumerate(events)]


def messages_events(stamp: str | None = None) -> list[bytes]:
    """A streamed Anthropic Message: message_start (input and cache usage), a text block with a ping,
    DELTAS text deltas, message_delta (stop reason, cumulative output tokens), message_stop."""
    start = {
        "id": MESSAGE_ID,
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 156,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 256,
            "output_tokens": 1,
            "service_tier": "standard",
        },
    }
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    for token in _tokens(DELTAS):
        text = stamp + token if stamp is not None else token
        events.append({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
    events += [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 198},
        },
        {"type": "message_stop"},
    ]
    return [_named(event) for event in events]


STREAM_MODES = ("stream", "responses", "messages")  # `python -m bench` modes that stream
MODE_PATHS = {
    "json": "/v1/chat/completions",
    "stream": "/v1/chat/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}
# SSE events a client counts per streamed answer: the chat stream's JSON chunks ([DONE] not counted),
# every event of the others
EVENTS_PER_STREAM = {"stream": STREAM_EVENTS, "responses": len(responses_events()), "messages": len(messages_events())}
END_MARKERS = {"stream": b"data: [DONE]", "responses": b"event: response.completed", "messages": b"event: message_stop"}


def mode_request_body(mode: str, include_usage: bool = True) -> bytes:
    """The request of a `python -m bench` mode: the chat one, or the same question for the other APIs."""
    if mode in ("json", "stream"):
        return request_body(mode == "stream", include_usage)
    if mode == "responses":
        body: dict[str, Any] = {
            "model": "gpt-4o",
            "instructions": _MESSAGES[0]["content"],
            "input": _MESSAGES[1]["content"],
            "max_output_tokens": 400,
            "stream": True,
        }
    else:
        body = {
            "model": "claude-sonnet-4-5",
            "system": _MESSAGES[0]["content"],
            "messages": [_MESSAGES[1]],
            "max_tokens": 400,
            "stream": True,
        }
    return orjson.dumps(body)
