"""What the SDK tests share: the bytes an official client received (a tee on its HTTP transport), the
clients pointed at the proxy, a ledger with prices, and cost worked out by hand."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import orjson
from aiohttp import web

from proxy.config import Config, ModelPrice, PricingConfig
from proxy.credentials import key_fingerprint

from .conftest import Ledger, make_config, start_ledger

KEY = "sk-test-apis-0123456789abcdef"
KEY_HASH = key_fingerprint(KEY)

# USD per million tokens, as a price table would hold them
PRICES: dict[str, dict[str, float]] = {
    "o4-mini*": {"prompt": 1.10, "completion": 4.40, "cache_read": 0.275},
    "text-embedding-3-small": {"prompt": 0.02, "completion": 0},
    "gpt-3.5-turbo-instruct*": {"prompt": 1.50, "completion": 2.00},
    "claude-sonnet-4-5*": {"prompt": 3, "completion": 15, "cache_read": 0.30, "cache_write": 3.75},
    "anthropic/*": {"prompt": 3, "completion": 15, "cache_read": 0.30, "cache_write": 3.75},
}


def usd(*terms: tuple[int, float]) -> Decimal:
    """Sum of tokens x USD-per-million rates, exactly."""
    return sum((Decimal(tokens) * Decimal(str(rate)) for tokens, rate in terms), Decimal(0)) / Decimal(1_000_000)


def priced_config(upstream_url: str, database_url: str, tmp_path: Path, **sections: dict[str, Any]) -> Config:
    models = {
        name: ModelPrice(**{k: Decimal(str(v)) for k, v in rates.items()}) for name, rates in PRICES.items()
    }
    config = make_config(upstream_url, database_url, tmp_path, **sections)
    return dataclasses.replace(config, pricing=PricingConfig(models=models))


async def priced_ledger(upstream_url: str, database_url: str, tmp_path: Path) -> Ledger:
    return await start_ledger(priced_config(upstream_url, database_url, tmp_path))


class Tee(httpx2.AsyncBaseTransport):
    """The client's real transport, keeping every response body's bytes as they came off the socket
    (before the client decodes anything)."""

    def __init__(self) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.bodies: list[bytearray] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self.inner.handle_async_request(request)
        kept = bytearray()
        self.bodies.append(kept)
        stream = response.stream

        class Copying(httpx2.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in stream:  # type: ignore[union-attr]
                    kept.extend(chunk)
                    yield chunk

            async def aclose(self) -> None:
                await stream.aclose()  # type: ignore[union-attr]

        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=Copying(),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def body(self) -> bytes:
        assert len(self.bodies) == 1, len(self.bodies)
        return bytes(self.bodies[0])


def openai_client(base_url: str, tee: Tee, scenario: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=KEY,
        max_retries=0,
        default_headers={"X-Fake-Scenario": scenario, **headers},
        http_client=httpx2.AsyncClient(transport=tee),
    )


def anthropic_client(base_url: str, tee: Tee, scenario: str, *, bearer: bool = False) -> anthropic.AsyncAnthropic:
    """Anthropic's client with the key in `x-api-key` (as Anthropic's API takes it, and as Claude Code
    and earlier SDKs send it), or as a bearer token (`auth_token`: OpenRouter's Anthropic endpoint)."""
    headers = {"X-Fake-Scenario": scenario}
    if not bearer:
        headers["x-api-key"] = KEY
    return anthropic.AsyncAnthropic(
        base_url=base_url,
        api_key=None,
        auth_token=KEY if bearer else None,
        max_retries=0,
        default_headers=headers,
        http_client=httpx2.AsyncClient(transport=tee),
    )


def echo_encoding(build: Any) -> Any:
    """A scenario answering with build(request JSON) as JSON (e.g. in the encoding the client asked)."""

    async def scenario(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response(body=orjson.dumps(build(orjson.loads(body))))

    return scenario


def tokens(row: dict[str, Any]) -> dict[str, Any]:
    names = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "cache_write_tokens")
    return {name: row[name] for name in (*names, "reasoning_tokens")}


def choices(row: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(c["index"], c["finish_reason"], c["native_finish_reason"], c["role"]) for c in row["choices"]]
