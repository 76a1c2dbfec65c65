"""Rollups: a batch of rows folded into per-group sums for usage_hourly, its narrower families and the tag tables.

Pure code, no I/O: the writer folds the rows it inserted and hands the sums to rollup_write.py, which adds
them to the tables in the same transaction. A group is keyed by its period, the dimension values ('' for
NULL) and `null_dims`, a bitmask with bit i set when DIMENSIONS[i] was NULL.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from itertools import repeat
from operator import add, itemgetter
from typing import Any

from .histogram import BUCKET_COLUMNS, BUCKETS, LOWER_BOUNDS

DIMENSIONS: tuple[str, ...] = (
    "model",
    "requested_model",
    "api",
    "upstream",
    "provider",
    "api_key_hash",
    "user",
    "outcome",
)
MODEL_DIMENSIONS: tuple[str, ...] = ("model", "requested_model", "api", "upstream", "provider", "outcome")


@dataclass(frozen=True, slots=True)
class RollupSpec:
    """A rollup table: its period ("hour" or "day") and the dimensions it keeps (a subset of DIMENSIONS)."""

    name: str
    period: str
    dimensions: tuple[str, ...]

    @property
    def mask(self) -> int:
        """The null_dims bits of its dimensions."""
        return sum(1 << DIMENSIONS.index(name) for name in self.dimensions)


@dataclass(frozen=True, slots=True)
class Family:
    """Rollup tables that keep the same dimensions: one per hour and, except the widest, one per day."""

    hourly: str
    daily: str | None
    dimensions: tuple[str, ...]


# Narrowest first: a query reads the first family holding every dimension it groups or filters by. A table
# with fewer dimensions has fewer rows: the user and key dimensions multiply the groups of the others.
FAMILIES: tuple[Family, ...] = (
    Family("usage_hourly_totals", "usage_daily_totals", ()),
    Family("usage_hourly_models", "usage_daily_models", ("model", "requested_model")),
    Family("usage_hourly_keys", "usage_daily_keys", ("api_key_hash",)),
    Family("usage_hourly_routes", "usage_daily_routes", MODEL_DIMENSIONS),
    Family("usage_hourly_users", "usage_daily_users", ("user",)),
    Family("usage_hourly", None, DIMENSIONS),
)
# usage_hourly first: the others are sums of it (the writer's fold and the rebuild compute them so)
ROLLUP_SPECS: tuple[RollupSpec, ...] = (
    RollupSpec("usage_hourly", "hour", DIMENSIONS),
    *(
        RollupSpec(name, period, family.dimensions)
        for family in FAMILIES[:-1]
        for name, period in ((family.hourly, "hour"), (family.daily, "day"))
        if name is not None
    ),
)
# where each table's sums come from: a family's hourly table from usage_hourly, its daily one from that
SOURCES: dict[str, str] = {
    name: source
    for family in FAMILIES[:-1]
    for name, source in ((family.hourly, "usage_hourly"), (family.daily, family.hourly))
    if name is not None
}
TOKENS: tuple[str, ...] = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
# errors: outcome != 'ok'; priced: rows with a cost; timed: rows with a duration (the histogram counts those);
# cost_pusd: the cost summed in pico-USD (10^-12 USD, the scale of the Money type), an exact integer
MEASURES: tuple[str, ...] = ("requests", "errors", *TOKENS, "priced", "timed", "cost_pusd")
VALUES: tuple[str, ...] = (*MEASURES, *BUCKET_COLUMNS)  # a rollup row's values, in this order

Key = tuple[Any, ...]
# a group's sums: the MEASURES in order, then its histogram as {bucket: count} of the non-zero buckets (a
# group of a few rows fills one or two of the 56)
Accumulator = list[Any]
Sums = dict[Key, Accumulator]
HISTOGRAM = len(MEASURES)  # the accumulator's histogram position

_PICO = Decimal(10) ** 12
_ONE = Decimal(1)
_HOUR_AND_DIMENSIONS = itemgetter("started_hour", *DIMENSIONS)
_row_measures = itemgetter(*TOKENS, "cost", "duration_ms")
_OK = "ok"


def pico_usd(cost: Decimal | float | int) -> int:
    """A cost in USD as an exact integer of pico-USD (a float as its shortest decimal text, as SQLite reads it
    back); sub-pico digits round half away from zero, as PostgreSQL's NUMERIC(24, 12) stores them."""
    value = cost if isinstance(cost, Decimal) else Decimal(str(cost))
    return int((value * _PICO).quantize(_ONE, ROUND_HALF_UP))


def _hour_and_dimensions(row: dict[str, Any]) -> Key:
    return tuple(map(row.get, ("started_hour", *DIMENSIONS)))


def _group(keys: list[Key], rows: Sequence[Any]) -> dict[Key, Sequence[Any]]:
    if not keys:
        return {}
    if keys.count(keys[0]) == len(keys):  # one group, as a batch of steady traffic often is
        return {keys[0]: rows}
    groups: dict[Key, list[Any]] = defaultdict(list)
    for key, row in zip(keys, rows, strict=True):
        groups[key].append(row)
    return groups


def _sums(raw_key: Key, rows: Sequence[Any], measures: Callable[[Any], tuple[Any, ...]]) -> Accumulator:
    """One group's accumulator."""
    error = raw_key[-1] != _OK
    if len(rows) == 1:  # the common case when many users or models share a batch
        *tokens, cost, duration = measures(rows[0])
        return [
            1,
            int(error),
            *(value or 0 for value in tokens),
            int(cost is not None),
            int(duration is not None),
            pico_usd(cost) if cost is not None else 0,
            {bisect_right(LOWER_BOUNDS, duration): 1} if duration is not None else {},
        ]
    *tokens, costs, durations = zip(*map(measures, rows), strict=True)
    priced = [cost for cost in costs if cost is not None]
    timed = [duration for duration in durations if duration is not None]
    histogram: dict[int, int] = {}
    for bucket in map(bisect_right, repeat(LOWER_BOUNDS), timed):  # bisect_right: bucket_of, without a call
        histogram[bucket] = histogram.get(bucket, 0) + 1
    requests = len(rows)
    return [
        requests,
        requests if error else 0,
        *(sum(filter(None, column)) for column in tokens),
        len(priced),
        len(timed),
        sum(map(pico_usd, priced)),
        histogram,
    ]


def _key(raw_key: Key) -> Key:
    """(hour, dimension values with '' for NULL, null_dims)."""
    if None not in raw_key:
        return (*raw_key, 0)
    null_dims = 0
    values = []
    for i, value in enumerate(raw_key[1:]):
        if value is None:
            null_dims |= 1 << i
            values.append("")
        else:
            values.append(value)
    return (raw_key[0], *values, null_dims)


def _add(into: Sums, key: Key, sums: Accumulator) -> None:
    found = into.get(key)
    if found is None:
        into[key] = [*sums[:HISTOGRAM], dict(sums[HISTOGRAM])]
        return
    found[:HISTOGRAM] = map(add, found[:HISTOGRAM], sums[:HISTOGRAM])
    histogram = found[HISTOGRAM]
    for bucket, count in sums[HISTOGRAM].items():
        histogram[bucket] = histogram.get(bucket, 0) + count


def dense(histogram: dict[int, int]) -> list[int]:
    """An accumulator's histogram as the 56 bucket counts."""
    counts = [0] * BUCKETS
    for bucket, count in histogram.items():
        counts[bucket] = count
    return counts


def _projections() -> list[tuple[RollupSpec, bool, Callable[[Key], tuple[Any, ...]]]]:
    """(spec, daily, the key's dimension values it keeps) for every table after usage_hourly: a daily key
    is its family's hourly key, an hourly key usage_hourly's."""
    found = []
    for spec in ROLLUP_SPECS[1:]:
        daily = spec.period == "day"
        if daily:
            positions = list(range(1, 1 + len(spec.dimensions)))
        else:
            positions = [1 + DIMENSIONS.index(name) for name in spec.dimensions]
        found.append((spec, daily, _dimensions_getter(positions)))
    return found


def _narrower(hourly: Sums) -> list[Sums]:
    """The sums of every table after usage_hourly (ROLLUP_SPECS order): a family's hourly table from
    usage_hourly's sums, its daily table from its hourly one (fewer groups to go through)."""
    found: dict[str, Sums] = {}
    for spec, daily, dimensions_of in _PROJECTIONS:
        source = found[SOURCES[spec.name]] if daily else hourly
        mask = spec.mask
        sums: Sums = {}
        for key, values in source.items():
            _add(sums, (key[0] // 24 if daily else key[0], *dimensions_of(key), key[-1] & mask), values)
        found[spec.name] = sums
    return list(found.values())


def _dimensions_getter(positions: list[int]) -> Callable[[Key], tuple[Any, ...]]:
    if not positions:
        return lambda key: ()
    getter = itemgetter(*positions)
    return (lambda key: (getter(key),)) if len(positions) == 1 else getter


def _fold(keys: list[Key], rows: Sequence[Any], measures: Callable[[Any], tuple[Any, ...]]) -> tuple[Sums, ...]:
    hourly: Sums = {}
    try:
        for raw_key, group in _group(keys, rows).items():
            if raw_key[0] is None:  # no started_at: the database refuses these rows, and their batch
                continue
            hourly[_key(raw_key)] = _sums(raw_key, group, measures)
    except (TypeError, ValueError, ArithmeticError) as exc:  # a bad spooled value: the batch is refused
        raise ValueError(f"rollups: {type(exc).__name__}: {exc}") from exc
    return hourly, *_narrower(hourly)


def fold(rows: Sequence[dict[str, Any]]) -> tuple[Sums, ...]:
    """The sums of the rows (dicts of column values with started_hour) for each table of ROLLUP_SPECS, each a
    dict key -> accumulator (the MEASURES, then {bucket: count}).

    Keys: (hour or day, the table's dimensions, null_dims with the bits of those dimensions); days are
    hours // 24."""
    try:
        keys = list(map(_HOUR_AND_DIMENSIONS, rows))
    except KeyError:  # a row without every column (an older spool line): the missing ones are NULL
        keys = list(map(_hour_and_dimensions, rows))
    return _fold(keys, rows, _row_measures)


@lru_cache(maxsize=4)
def _positions(columns: tuple[str, ...]) -> tuple[Callable[[Any], Key], Callable[[Any], tuple[Any, ...]]]:
    where = columns.index
    return (
        itemgetter(where("started_hour"), *map(where, DIMENSIONS)),
        itemgetter(*map(where, (*TOKENS, "cost", "duration_ms"))),
    )


def fold_values(values: Sequence[tuple[Any, ...]], columns: tuple[str, ...]) -> tuple[Sums, ...]:
    """fold() of rows given as tuples in `columns` order (the writer's driver parameters: a cost there is
    what the database stores, a float on SQLite)."""
    keys_of, measures = _positions(columns)
    return _fold(list(map(keys_of, values)), values, measures)


TAG_DIMENSIONS: tuple[str, ...] = ("tag", "value")
# a call without tags is counted under this pair (tag names are never empty), so by-tag stats can show it
NO_TAGS = ("", "")
TAG_SPECS: tuple[RollupSpec, ...] = (
    RollupSpec("usage_hourly_tags", "hour", TAG_DIMENSIONS),
    RollupSpec("usage_daily_tags", "day", TAG_DIMENSIONS),
)
_TAG_MEASURES = (*TOKENS, "cost", "duration_ms")


def _tag_measures(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(map(row.get, _TAG_MEASURES))


def _tag_pairs(tags: Any) -> Iterable[tuple[str, str]]:
    if isinstance(tags, dict) and tags:
        return ((str(name), str(value)) for name, value in tags.items())
    return (NO_TAGS,)


def fold_tags(rows: Sequence[dict[str, Any]]) -> tuple[Sums, Sums]:
    """(usage_hourly_tags, usage_daily_tags) sums of the rows: each call counts once under each of its tag
    pairs (a call with two tags in both), a call without tags under NO_TAGS. Keys: (hour or day, tag, value)."""
    keys: list[Key] = []
    members: list[dict[str, Any]] = []
    for row in rows:  # grouped by the whole tag set first: calls of a batch mostly share theirs
        hour = row.get("started_hour")
        if hour is None:
            continue
        tags = row.get("tags")
        pairs = tuple(_tag_pairs(tags)) if tags else (NO_TAGS,)
        keys.append((hour, pairs, row.get("outcome")))  # outcome last: _sums counts errors by it
        members.append(row)
    hourly: Sums = {}
    daily: Sums = {}
    try:
        for raw_key, group in _group(keys, members).items():
            sums = _sums(raw_key, group, _tag_measures)
            hour, pairs, _ = raw_key
            for name, value in pairs:
                _add(hourly, (hour, name, value), sums)
                _add(daily, (hour // 24, name, value), sums)
    except (TypeError, ValueError, ArithmeticError) as exc:  # a bad spooled value: the batch is refused
        raise ValueError(f"rollups: {type(exc).__name__}: {exc}") from exc
    return hourly, daily


_PRICED = MEASURES.index("priced")
_COST = MEASURES.index("cost_pusd")


def cost_changes(changes: Iterable[tuple[Any, Decimal | None, Decimal | None]]) -> tuple[Sums, ...]:
    """What re-pricing rows changes in the rollups: each table's sums of `priced` and `cost_pusd`
    differences (ROLLUP_SPECS, then TAG_SPECS), from (row with started_hour, the dimensions and tags, old
    cost, new cost) triples."""
    hourly: Sums = {}
    tags_hourly: Sums = {}
    tags_daily: Sums = {}
    for row, before, after in changes:
        delta: Accumulator = [0] * len(MEASURES) + [{}]
        delta[_PRICED] = (after is not None) - (before is not None)
        delta[_COST] = (pico_usd(after) if after is not None else 0) - (pico_usd(before) if before is not None else 0)
        if (delta[_PRICED] or delta[_COST]) and row.started_hour is not None:  # else: written around the writer
            _add(hourly, _key((row.started_hour, *(getattr(row, name) for name in DIMENSIONS))), delta)
            for name, value in _tag_pairs(row.tags):
                _add(tags_hourly, (row.started_hour, name, value), delta)
                _add(tags_daily, (row.started_hour // 24, name, value), delta)
    return hourly, *_narrower(hourly), tags_hourly, tags_daily


_PROJECTIONS = _projections()
