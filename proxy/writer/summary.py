"""A batch of records reduced to what the Prometheus metrics need: per-label sums and bucket counts.

Computed by the writer, once per batch, never on the request path; small enough to send from the writer
process to the serving process that answers /_ledger/metrics (web/metrics.py adds them up).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..parse import CompletionRecord

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


def _bucket(
    histograms: dict[tuple[str, str], list[float]], labels: tuple[str, str], bounds: tuple[float, ...], value: float
) -> None:
    """Count value in its bucket of labels' series (le: the first bound not below it), and in the sum."""
    series = histograms.get(labels)
    if series is None:
        series = histograms[labels] = [0] * (len(bounds) + 1) + [0.0]
    series[bisect_left(bounds, value)] += 1
    series[-1] += value


@dataclass(slots=True)
class BatchSummary:
    """A batch of records reduced to per-label sums and bucket counts: what the metrics need, small
    enough to send from the writer process to the one serving /metrics."""

    requests: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    sums: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    durations: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    ttfts: dict[tuple[str, str], list[float]] = field(default_factory=dict)


def summarize(records: Iterable[CompletionRecord], into: BatchSummary | None = None) -> BatchSummary:
    """records' sums and bucket counts, added to `into` when given (the writer process sends one
    summary per stats message, whatever the number of batches it wrote meanwhile)."""
    summary = BatchSummary() if into is None else into
    requests = summary.requests
    for record in records:
        labels = (record.upstream, record.model or record.requested_model or "unknown")
        status = str(record.status_code) if record.status_code is not None else "none"
        key = (*labels, status, record.outcome)
        requests[key] = requests.get(key, 0) + 1
        totals = summary.sums.get(labels)
        if totals is None:
            totals = summary.sums[labels] = [0, 0, 0, 0.0, 0]
        totals[0] += record.prompt_tokens or 0
        totals[1] += record.completion_tokens or 0
        totals[2] += record.cached_tokens or 0
        if record.cost is not None:
            totals[3] += float(record.cost)
        else:
            totals[4] += 1
        if record.duration_ms is not None:
            _bucket(summary.durations, labels, DURATION_BUCKETS, record.duration_ms / 1000)
        if record.ttft_ms is not None and record.stream:  # non-streamed calls: time to headers
            _bucket(summary.ttfts, labels, TTFT_BUCKETS, record.ttft_ms / 1000)
    return summary

