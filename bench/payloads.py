"""Fixed, realistic bodies for the benchmark: one chat request, one ChatCompletion, one 200-event stream.

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
