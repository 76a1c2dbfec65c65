"""Prometheus metrics of one proxy process (each worker has its own registry).

Counters and histograms are fed by the writer, once per batch of records, never on the request path.
Histograms arrive already bucketed (writer/summary.py runs in the writer): the serving process adds a
few short lists per batch instead of paying prometheus_client's Histogram.observe for every call.
The writer's own state (queue depth, rows written/spooled/lost) is read from the recorder at scrape time.
Model names come from clients, so the `model` label is capped: past MAX_MODELS distinct values new
names are counted as "other" instead of growing the registry without bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..parse import CompletionRecord
from ..writer.protocol import Recorder
from ..writer.summary import DURATION_BUCKETS, TTFT_BUCKETS, BatchSummary, summarize

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_MODELS = 500
OTHER = "other"


class _WriterCollector(Collector):
    def __init__(self) -> None:
        self.recorder: Recorder | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        if self.recorder is None:
            return
        stats = self.recorder.stats()
        yield GaugeMetricFamily(
            "chatledger_writer_queue_depth",
            "Records waiting for the database writer",
            value=stats.queue_depth,
        )
        yield GaugeMetricFamily(
            "chatledger_database_up",
            "1 while database writes succeed, 0 while spooling",
            value=1 if stats.database_ok else 0,
        )
        for name, help_text, value in (
            ("chatledger_rows_written", "Rows inserted by the writer", stats.rows_written),
            (
                "chatledger_rows_spooled",
                "Rows written to the disk spool instead of the database",
                stats.rows_spooled,
            ),
            (
                "chatledger_rows_replayed",
                "Spooled rows later inserted into the database",
                stats.rows_replayed,
            ),
            (
                "chatledger_rows_lost",
                "Rows neither the database nor the spool could take",
                stats.rows_lost,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        if stats.calls_parsed_in_server is not None:  # only with a writer process
            yield CounterMetricFamily(
                "chatledger_calls_parsed_in_server",
                "Calls the serving process parsed itself because its writer process was behind",
                value=stats.calls_parsed_in_server,
            )


class _BucketedHistogram(Collector):
    """A histogram per (upstream, model) fed with bucket counts (`add`), not single observations.

    Each series is a list: one count per bucket in DURATION_BUCKETS/TTFT_BUCKETS order, one for values
    above the last bound, then the sum of the values."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help_text = help_text
        self.bounds = [floatToGoString(bound) for bound in buckets] + ["+Inf"]
        self.series: dict[tuple[str, str], list[float]] = {}

    def add(self, labels: tuple[str, str], counts: list[float]) -> None:
        series = self.series.get(labels)
        if series is None:
            self.series[labels] = list(counts)
        else:
            for index, count in enumerate(counts):
                series[index] += count

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.help_text, labels=("upstream", "model"))
        for labels, series in self.series.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip(self.bounds, series, strict=False):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, sum_value=series[-1])
        yield family



class LedgerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        per_model = ("upstream", "model")
        self.requests = Counter(
            "chatledger_requests",
            "Logged calls by upstream, model, HTTP status and outcome",
            ("upstream", "model", "status", "outcome"),
            registry=self.registry,
        )
        self.prompt_tokens = Counter("chatledger_prompt_tokens", "Prompt tokens", per_model, registry=self.registry)
        self.completion_tokens = Counter(
            "chatledger_completion_tokens", "Completion tokens", per_model, registry=self.registry
        )
        self.cached_tokens = Counter(
            "chatledger_cached_tokens", "Prompt tokens read from a cache", per_model, registry=self.registry
        )
        self.cost = Counter("chatledger_cost_usd", "Known cost in USD", per_model, registry=self.registry)
        self.unpriced = Counter(
            "chatledger_unpriced_requests",
            "Logged calls whose cost is unknown",
            per_model,
            registry=self.registry,
        )
        self.duration = _BucketedHistogram(
            "chatledger_request_duration_seconds",
            "Time from request to the end of the response",
            DURATION_BUCKETS,
        )
        self.ttft = _BucketedHistogram(
            "chatledger_time_to_first_token_seconds",
            "Streamed calls: time to the first content chunk",
            TTFT_BUCKETS,
        )
        self.registry.register(self.duration)
        self.registry.register(self.ttft)
        self._writer = _WriterCollector()
        self.registry.register(self._writer)
        self._models: set[str] = set()

    def watch(self, recorder: Recorder) -> None:
        self._writer.recorder = recorder

    def _model(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODELS:
            return OTHER
        self._models.add(model)
        return model

    def observe(self, records: Sequence[CompletionRecord]) -> None:
        """Count a batch of records (called by the writer before it inserts them)."""
        self.apply(summarize(records))

    def apply(self, summary: BatchSummary) -> None:
        """Add a batch's sums to the counters: a labels() lookup costs more than the arithmetic, and a
        batch of hundreds of records usually has a handful of label sets."""
        for histogram, bucketed in ((self.duration, summary.durations), (self.ttft, summary.ttfts)):
            for (upstream, model), counts in bucketed.items():
                histogram.add((upstream, self._model(model)), counts)
        for (upstream, model, status, outcome), count in summary.requests.items():
            self.requests.labels(upstream, self._model(model), status, outcome).inc(count)
        for (upstream, model), (prompt, completion, cached, cost, unpriced) in summary.sums.items():
            labels = (upstream, self._model(model))
            for counter, value in (
                (self.prompt_tokens, prompt),
                (self.completion_tokens, completion),
                (self.cached_tokens, cached),
                (self.cost, cost),
                (self.unpriced, unpriced),
            ):
                if value:
                    counter.labels(*labels).inc(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
