"""The overview's chart as geometry: stacked bars per time bucket, one series per model, ready for the SVG
template (which escapes every label). Pure code: series points in, rectangles and ticks out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from ...store.series import OTHER, UNKNOWN_MODEL, SeriesPoint
from .render import money

WIDTH = 720
HEIGHT = 240
LEFT = 64  # room for the value axis labels
BOTTOM = 24  # room for the time axis labels
TOP = 8
MAX_BUCKETS = 400
PALETTE_SIZE = 7  # CSS classes s0..s6; "other" always takes the last


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: int
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True, slots=True)
class Legend:
    name: str
    series: int
    linked: bool


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    left: int
    bottom: float
    bars: tuple[Bar, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    legend: tuple[Legend, ...]
    measure: str  # "cost" or "requests" (when no call in the period has a known cost)
    title: str


def bucket_for(since: datetime | None, until: datetime | None, now: datetime) -> Literal["hour", "day"]:
    """Hours for a period of up to two days, days beyond (or when the period has no start)."""
    if since is None:
        return "day"
    return "hour" if (until or now) - since <= timedelta(days=2) else "day"


def _floor(moment: datetime, bucket: str) -> datetime:
    moment = moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if bucket == "day" else moment


def _buckets(points: Sequence[SeriesPoint], since: datetime | None, until: datetime, bucket: str) -> list[datetime]:
    step = timedelta(hours=1) if bucket == "hour" else timedelta(days=1)
    seen = sorted({point.bucket for point in points})
    start = _floor(since, bucket) if since is not None else (seen[0] if seen else _floor(until, bucket))
    end = _floor(until, bucket)
    if (end - start) / step >= MAX_BUCKETS:  # a long period: only the buckets that have calls
        return seen[-MAX_BUCKETS:]
    out = []
    while start <= end:
        out.append(start)
        start += step
    return out


def _nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above value (the axis top)."""
    if value <= 0:
        return 1.0
    scale = 10.0 ** math.floor(math.log10(value))
    return next(scale * f for f in (1, 2, 2.5, 5, 10) if scale * f >= value * (1 - 1e-9))


def _value_label(value: float, measure: str) -> str:
    if measure == "requests":
        return f"{value:,.0f}" if value >= 1 or value == 0 else f"{value:g}"
    return money(Decimal(repr(round(value, 8))))


def build_chart(
    points: Sequence[SeriesPoint], since: datetime | None, until: datetime, bucket: Literal["hour", "day"]
) -> Chart:
    names: list[str] = []
    for point in points:
        if point.model not in names:
            names.append(point.model)
    names.sort(key=lambda name: name == OTHER)
    series = {name: (PALETTE_SIZE - 1 if name == OTHER else min(i, PALETTE_SIZE - 2)) for i, name in enumerate(names)}
    measure = "cost" if any(point.cost is not None for point in points) else "requests"
    by_bucket: dict[datetime, list[SeriesPoint]] = {}
    for point in points:
        by_bucket.setdefault(point.bucket, []).append(point)
    buckets = _buckets(points, since, until, bucket)

    def value(point: SeriesPoint) -> float:
        return float(point.cost or 0) if measure == "cost" else float(point.requests)

    top = _nice_max(max((sum(value(p) for p in by_bucket.get(b, ())) for b in buckets), default=0.0))
    plot_width = WIDTH - LEFT - 4
    plot_height = HEIGHT - TOP - BOTTOM
    slot = plot_width / max(len(buckets), 1)
    gap = min(2.0, slot * 0.2)
    stamp = "%Y-%m-%d %H:00" if bucket == "hour" else "%Y-%m-%d"
    bars = []
    for i, moment in enumerate(buckets):
        base = HEIGHT - BOTTOM
        for point in by_bucket.get(moment, ()):
            height = plot_height * value(point) / top
            if height <= 0:
                continue
            base -= height
            shown = money(point.cost) if measure == "cost" else f"{point.requests:,} requests"
            title = f"{moment.strftime(stamp)} UTC · {point.model}: {shown} ({point.requests:,} calls)"
            bars.append(Bar(round(LEFT + i * slot + gap / 2, 2), round(base, 2), round(max(slot - gap, 0.5), 2),
                            round(height, 2), series[point.model], title))  # fmt: skip
    y_ticks = tuple(
        Tick(round(HEIGHT - BOTTOM - plot_height * f, 2), _value_label(top * f, measure)) for f in (0, 0.5, 1)
    )
    every = max(1, len(buckets) // 6)
    label = "%H:00" if bucket == "hour" else "%b %d"
    x_ticks = tuple(
        Tick(round(LEFT + i * slot + slot / 2, 2), moment.strftime(label))
        for i, moment in enumerate(buckets)
        if i % every == 0
    )
    legend = tuple(Legend(name, series[name], name not in (OTHER, UNKNOWN_MODEL)) for name in names)
    what = "Spend" if measure == "cost" else "Requests (no call in this period has a known cost)"
    title = f"{what} per {bucket}, stacked by model"
    return Chart(WIDTH, HEIGHT, LEFT, HEIGHT - BOTTOM, tuple(bars), y_ticks, x_ticks, legend, measure, title)
