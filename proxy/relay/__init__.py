"""The request path: a call is forwarded byte for byte and a copy of it handed to the writer.

- handler.py         the catch-all route's handler (Forwarder) and the Capture it submits
- routing.py         which upstream a call goes to ([[routes]]) and which API it is parsed as
- policy.py          which headers pass in each direction, which targets are refused
- copies.py          the bounded copy of a response kept for the writer, and the budget all copies share
- request_ids.py     UUIDv7 request ids
- aiohttp_compat.py  the aiohttp internals the relay relies on, in one tested place
- server_compat.py   the aiohttp server internals behind the connection limits (timeouts, cap, bad requests)
"""
