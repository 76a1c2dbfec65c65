"""JSON responses of the ledger's endpoints: bodies, and errors in the OpenAI error shape."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..store.queries import to_json


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=to_json(data), content_type="application/json")


def api_error(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    error: dict[str, Any] = {"message": message, "type": "invalid_request_error", "code": code}
    if param is not None:
        error["param"] = param
    return json_response({"error": error}, status)
