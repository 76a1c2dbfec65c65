"""OpenRouter's models list (`GET /api/v1/models`) as prices: parsed (pure) and fetched."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from ...config import ModelPrice
from .book import PER_MILLION


def _per_million(value: Any) -> Decimal | None:
    """USD per token as OpenRouter writes it ("0.0000025") → USD per million; None if absent or negative."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0:
        return None  # "-1" marks variable pricing (openrouter/auto)
    return (amount * PER_MILLION).normalize() + 0


def parse_openrouter_models(payload: Any) -> dict[str, ModelPrice]:
    """`GET /api/v1/models` → {model id: price}. Optional rates of 0 mean "not priced separately"."""
    models: dict[str, ModelPrice] = {}
    data = payload.get("data") if isinstance(payload, dict) else None
    for item in data if isinstance(data, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
            continue
        pricing = item.get("pricing")
        if not isinstance(pricing, dict):
            continue
        prompt, completion = _per_million(pricing.get("prompt")), _per_million(pricing.get("completion"))
        if prompt is None or completion is None:
            continue
        optional = {
            name: _per_million(pricing.get(key))
            for name, key in (
                ("cache_read", "input_cache_read"),
                ("cache_write", "input_cache_write"),
                ("reasoning", "internal_reasoning"),
            )
        }
        models[item["id"]] = ModelPrice(
            prompt, completion, **{name: (rate if rate else None) for name, rate in optional.items()}
        )
    return models


async def fetch_openrouter_prices(url: str, seconds: float = 30.0) -> dict[str, ModelPrice]:
    """Fetch `<url>/api/v1/models` (OpenRouter's format) and parse the prices."""
    import aiohttp

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds), trust_env=False) as session,
        session.get(url.rstrip("/") + "/api/v1/models", headers={"Accept": "application/json"}) as response,
    ):
        if response.status != 200:
            raise RuntimeError(f"GET {response.url} answered HTTP {response.status}")
        payload = await response.json(content_type=None)
    prices = parse_openrouter_models(payload)
    if not prices:
        raise RuntimeError(f"{url}/api/v1/models returned no priced models")
    return prices
