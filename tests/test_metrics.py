"""/_ledger/metrics after real calls through the proxy (plain, streamed, an upstream error, OpenRouter with
its own cost, a call priced from the config), parsed with prometheus_client's own parser."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ModelPrice
from proxy.parse.record import CompletionRecord
from proxy.web import metrics as metrics_module
from proxy.web.metrics import LedgerMetrics

from .conftest import make_config, start_ledger
from .payloads import OPENAI_BASIC, OPENAI_ERROR_429, OPENROUTER_WITH_COST, openai_stream
from .upstream import FakeUpstream, json_reply, sse_reply

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_metrics_after_real_calls(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> None:
    upstream.add("stream", sse_reply(openai_stream(), delay=0.002))
    upstream.add("limited", json_reply(OPENAI_ERROR_429, status=429))
    upstream.add("openrouter", json_reply(OPENROUTER_WITH_COST))
    price = ModelPrice(Decimal("2.5"), Decimal(10), cache_read=Decimal("1.25"))
    config = make_config(upstream.url, database_url, tmp_path, pricing={"models": {"gpt-4o-2024-*": price}})
    ledger = await start_ledger(config)
    try:
        client = openai.AsyncOpenAI(base_url=ledger.url + "/v1", api_key="sk-metrics", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        await client.chat.completions.create(model="gpt-4o", messages=messages)
        await client.chat.completions.create(model="gpt-4o", messages=messages)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True, extra_headers={"X-Fake-Scenario": "stream"}
        )
        async for _ in stream:
            pass
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model="gpt-4o", messages=messages, extra_headers={"X-Fake-Scenario": "limited"}
            )
        await client.chat.completions.create(
            model="anthropic/claude-sonnet-4",
            messages=messages,
            extra_headers={"X-Fake-Scenario": "openrouter"},
        )
        await client.close()
        rows = await ledger.rows()
        async with (
            aiohttp.ClientSession() as session,
            session.get(ledger.url + "/_ledger/metrics") as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await response.text()
    finally:
        await ledger.stop()

    samples = parse(text)
    up = upstream.url
    basic, mini, sonnet = OPENAI_BASIC["model"], "gpt-4o-mini-2024-07-18", OPENROUTER_WITH_COST["model"]
    assert len(rows) == 5
    assert (
        value(samples, "chatledger_requests_total", upstream=up, model=basic, status="200", outcome="ok") == 2
    )
    assert (
        value(samples, "chatledger_requests_total", upstream=up, model=mini, status="200", outcome="ok") == 1
    )
    assert (
        value(
            samples,
            "chatledger_requests_total",
            upstream=up,
            model="gpt-4o",
            status="429",
            outcome="upstream_error",
        )
        == 1
    )
    assert (
        value(samples, "chatledger_requests_total", upstream=up, model=sonnet, status="200", outcome="ok")
        == 1
    )

    usage = OPENAI_BASIC["usage"]
    assert (
        value(samples, "chatledger_prompt_tokens_total", upstream=up, model=basic)
        == 2 * usage["prompt_tokens"]
    )
    assert value(samples, "chatledger_completion_tokens_total", upstream=up, model=basic) == (
        2 * usage["completion_tokens"]
    )
    assert value(samples, "chatledger_cached_tokens_total", upstream=up, model=basic) == (
        2 * usage["prompt_tokens_details"]["cached_tokens"]
    )
    assert value(samples, "chatledger_prompt_tokens_total", upstream=up, model=mini) == 19
    logged_cost = {row["model"]: row["cost"] for row in rows if row["cost"] is not None}
    assert value(samples, "chatledger_cost_usd_total", upstream=up, model=basic) == pytest.approx(
        2 * float(logged_cost[basic])
    )
    assert value(samples, "chatledger_cost_usd_total", upstream=up, model=sonnet) == pytest.approx(
        OPENROUTER_WITH_COST["usage"]["cost"]
    )
    assert value(samples, "chatledger_unpriced_requests_total", upstream=up, model=mini) == 1
    assert value(samples, "chatledger_unpriced_requests_total", upstream=up, model="gpt-4o") == 1

    assert value(samples, "chatledger_request_duration_seconds_count", upstream=up, model=basic) == 2
    durations = [row["duration_ms"] / 1000 for row in rows if row["model"] == basic]
    assert value(
        samples, "chatledger_request_duration_seconds_sum", upstream=up, model=basic
    ) == pytest.approx(sum(durations))
    assert (
        value(samples, "chatledger_request_duration_seconds_bucket", upstream=up, model=basic, le="+Inf") == 2
    )
    assert value(samples, "chatledger_time_to_first_token_seconds_count", upstream=up, model=mini) == 1
    assert (
        "chatledger_time_to_first_token_seconds_count",
        frozenset({("upstream", up), ("model", basic)}),
    ) not in samples  # only streamed calls have a time to first token

    assert value(samples, "chatledger_rows_written_total") == 5
    assert value(samples, "chatledger_rows_spooled_total") == 0
    assert value(samples, "chatledger_rows_lost_total") == 0
    assert value(samples, "chatledger_writer_queue_depth") == 0
    assert value(samples, "chatledger_database_up") == 1


def _record(model: str) -> CompletionRecord:
    return CompletionRecord(
        request_id=model,
        started_at=datetime.now(UTC),
        method="POST",
        path="/v1/chat/completions",
        upstream="u",
        status_code=200,
        model=model,
        prompt_tokens=1,
        completion_tokens=1,
    )


def test_client_chosen_model_names_cannot_grow_the_registry_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "MAX_MODELS", 2)
    metrics = LedgerMetrics()
    metrics.observe([_record(f"model-{n}") for n in range(5)] + [_record("model-0")])
    samples = parse(metrics.render().decode())
    models: dict[str, Any] = {}
    for (name, labels), count in samples.items():
        if name == "chatledger_requests_total":
            models[dict(labels)["model"]] = count
    assert models == {"model-0": 2, "model-1": 1, "other": 3}
    assert not any(name.startswith("chatledger_rows_") for name, _ in samples)  # no recorder attached yet


def test_pre_bucketed_histograms_match_prometheus_clients_own() -> None:
    """The writer buckets durations itself; /metrics must read exactly as prometheus_client's Histogram
    fed the same values would (bounds included: a value equal to a bound counts in that bucket)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    durations = [0.01, 0.05, 0.0500001, 0.1, 1, 2.5, 7, 300, 301, 1e6, 0.0]
    records = []
    for n, seconds in enumerate(durations):
        record = _record("model-a" if n % 3 else "model-b")
        record.duration_ms = seconds * 1000
        record.ttft_ms = seconds * 500
        record.stream = n % 2 == 0
        records.append(record)
    metrics = LedgerMetrics()
    metrics.observe(records[:4])
    metrics.observe(records[4:])  # two batches add up

    registry = CollectorRegistry()
    reference = {
        name: Histogram(name, "reference", ("upstream", "model"), buckets=buckets, registry=registry)
        for name, buckets in (
            ("chatledger_request_duration_seconds", metrics_module.DURATION_BUCKETS),
            ("chatledger_time_to_first_token_seconds", metrics_module.TTFT_BUCKETS),
        )
    }
    for record in records:
        labels = ("u", record.model)
        reference["chatledger_request_duration_seconds"].labels(*labels).observe(record.duration_ms / 1000)
        if record.stream:
            reference["chatledger_time_to_first_token_seconds"].labels(*labels).observe(record.ttft_ms / 1000)

    def histogram_samples(samples: Samples) -> Samples:
        return {
            key: count
            for key, count in samples.items()
            if key[0].startswith(tuple(reference)) and not key[0].endswith("_created")
        }

    ours = histogram_samples(parse(metrics.render().decode()))
    expected = histogram_samples(parse(generate_latest(registry).decode()))
    assert len(expected) == 2 * (len(metrics_module.DURATION_BUCKETS) + 3) + 2 * (
        len(metrics_module.TTFT_BUCKETS) + 3
    )
    assert ours.keys() == expected.keys()
    for key, count in expected.items():
        assert ours[key] == pytest.approx(count), key
