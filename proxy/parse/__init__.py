"""Parsing: a captured call becomes one CompletionRecord. Pure code: no sockets, no database.

`materialize(capture)` (capture.py) is the one entry point; the writer calls it, and so does the
serving process when its writer process falls behind. One module per wire format and layer:

- capture.py       the Capture hand-off and `materialize`
- request.py       the client's request body: model, stream, user, usage injection; tags
- formats.py       each API's wire format: body parser, stream fold
- chat_json.py     a chat (or legacy text) completion JSON body
- chat_stream.py   a chat (or legacy text) completion SSE stream, folded chunk by chunk
- stream_bytes.py  byte-level proofs that a run of chat stream blocks changes nothing
- responses.py     an OpenAI Responses API body; responses_stream.py its event stream
- messages.py      an Anthropic Messages body; messages_stream.py its event stream
- event_fold.py    what the named-event stream folds share
- embeddings.py    an embeddings body
- stream_tap.py    SSE reads -> decoder -> fold (and the usage-chunk strip the request path uses)
- sse.py           the incremental SSE decoder
- decoders.py      bounded Content-Encoding decoders and the body copy
- usage.py         usage objects of every API -> token columns
- outcome.py       ok / upstream_error / unparsed / ... and the error text
- record.py        CompletionRecord, ChoiceRecord
- fields.py        typed reads of JSON values (never raise, never guess)
"""

from .capture import Capture, materialize
from .record import ChoiceRecord, CompletionRecord

__all__ = ["Capture", "ChoiceRecord", "CompletionRecord", "materialize"]
