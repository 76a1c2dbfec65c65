"""The wire format of each API the ledger parses (`completions.api`): its JSON body parser and its
stream fold. The request path names the API from the method and path (relay/routing.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .chat_json import parse_completion_body
from .chat_stream import StreamFolder
from .embeddings import parse_embeddings_body
from .messages import parse_message_body
from .messages_stream import MessagesFolder
from .record import CompletionRecord
from .responses import parse_response_body
from .responses_stream import ResponsesFolder
from .stream_tap import Folder


@dataclass(frozen=True, slots=True)
class WireFormat:
    api: str
    what: str  # names the expected body in "response could not be parsed as ..."
    parse_body: Callable[[CompletionRecord, bytes], bool]
    new_folder: Callable[[CompletionRecord, int], Folder] | None  # record, expected choices; None: never streams
    injects_usage: bool  # its streams carry usage only when asked (stream_options.include_usage)


def _chat_folder(record: CompletionRecord, choices: int) -> Folder:
    return StreamFolder(record, choices)


def _text_folder(record: CompletionRecord, choices: int) -> Folder:
    return StreamFolder(record, choices, roles=False)


def _responses_folder(record: CompletionRecord, choices: int) -> Folder:
    return ResponsesFolder(record)


def _messages_folder(record: CompletionRecord, choices: int) -> Folder:
    return MessagesFolder(record)


FORMATS: dict[str, WireFormat] = {
    "chat": WireFormat("chat", "a chat completion", parse_completion_body, _chat_folder, True),
    "completions": WireFormat("completions", "a text completion", parse_completion_body, _text_folder, True),
    "responses": WireFormat("responses", "a Responses API response", parse_response_body, _responses_folder, False),
    "embeddings": WireFormat("embeddings", "an embeddings list", parse_embeddings_body, None, False),
    "messages": WireFormat("messages", "an Anthropic message", parse_message_body, _messages_folder, False),
}
