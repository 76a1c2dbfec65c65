"""Filters and aggregates over logged completions: the one module the CLI and the HTTP API query through.

Every value a user supplies reaches SQL as a bound parameter. Filter parsing raises `FilterError`
naming the parameter, so the API can answer 400 and the CLI can name the flag.

Percentiles: PostgreSQL has percentile_cont. SQLite has none, so the same interpolated value is
computed from the two rows around the wanted rank: for `--by model` by walking the covering index
(model, requested_model, duration_ms, ...) of migration 0002 with LIMIT/OFFSET (SQLite merges the
per-pair index ranges without sorting), for other groupings with row_number() over the filtered rows.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import (
    Integer,
    Select,
    and_,
    case,
    cast,
    desc,
    func,
    literal,
    literal_column,
    or_,
    select,
    true,
    tuple_,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from .db import ApiKey, Money, choices_table, completions_table
from .request_facts import key_fingerprint

c = completions_table.c
COLUMNS = tuple(completions_table.c.keys())
CHOICE_COLUMNS = ("index", "finish_reason", "native_finish_reason", "role")
FILTER_PARAMS = ("model", "since", "until", "user", "tag", "key", "outcome", "status", "stream")
DIMENSIONS = ("model", "day", "hour", "user", "key", "tag", "provider", "upstream")
PERCENTILES = (0.5, 0.95)
MAX_UNION_ARMS = 200
MAX_WANTED_RANKS = 8000
MIN_PREFIX = 6
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_HASH = re.compile(r"[0-9a-f]{16}")


class FilterError(ValueError):
    """A bad filter value; `param` is the query parameter (or flag without dashes) it came from."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def parse_time(value: str, param: str = "since", now: datetime | None = None) -> datetime:
    """ISO 8601 (naive = UTC) or a relative age such as 30m, 1h, 7d, 2w, 1h30m (meaning that long ago)."""
    text = value.strip()
    relative = _RELATIVE.findall(text)
    if relative and _RELATIVE.sub("", text).strip() == "":
        delta = timedelta()
        for amount, unit in relative:
            delta += timedelta(**{_UNITS[unit.lower()]: float(amount)})
        return (now or datetime.now(UTC)) - delta
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(param, f"expected an ISO time or an age like 1h, 7d, 30m; got {value!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def key_hash(value: str) -> str:
    """A key fingerprint given either the fingerprint itself or the key (which is hashed, never kept)."""
    value = value.strip()
    if not value.startswith("sk-") and _HASH.fullmatch(value):
        return value
    return key_fingerprint(value)


def _tag_key(param: str, key: str) -> str:
    if not key or '"' in key or "\\" in key:
        raise FilterError(param, f"invalid tag name {key!r}")
    return key


@dataclass(frozen=True, slots=True)
class Filters:
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    user: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    key: str | None = None
    outcome: str | None = None
    status: int | None = None
    stream: bool | None = None


def _values(raw: Any) -> list[str]:
    if raw is None:
        return []
    return [str(v) for v in raw] if isinstance(raw, list | tuple) else [str(raw)]


def parse_filters(params: Mapping[str, Any], now: datetime | None = None) -> Filters:
    """Build Filters from {param: string or list of strings}; unknown params are an error."""
    unknown = sorted(set(params) - set(FILTER_PARAMS))
    if unknown:
        raise FilterError(unknown[0], "unknown parameter")

    def one(name: str) -> str | None:
        found = [v for v in _values(params.get(name)) if v != ""]
        if len(found) > 1:
            raise FilterError(name, "given more than once")
        return found[0] if found else None

    since, until = one("since"), one("until")
    tags = []
    for raw in _values(params.get("tag")):
        name, sep, value = raw.partition("=")
        if not sep:
            raise FilterError("tag", f"expected key=value, got {raw!r}")
        tags.append((_tag_key("tag", name.strip()), value.strip()))
    status = one("status")
    if status is not None and not (status.isdigit() and 100 <= int(status) <= 599):
        raise FilterError("status", f"expected an HTTP status code, got {status!r}")
    stream = one("stream")
    if stream is not None and stream.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise FilterError("stream", f"expected true or false, got {stream!r}")
    filters = Filters(
        model=one("model"),
        since=parse_time(since, "since", now) if since else None,
        until=parse_time(until, "until", now) if until else None,
        user=one("user"),
        tags=tuple(tags),
        key=one("key"),
        outcome=one("outcome"),
        status=int(status) if status is not None else None,
        stream=stream.lower() in ("true", "1", "yes") if stream is not None else None,
    )
    if filters.since and filters.until and filters.since >= filters.until:
        raise FilterError("until", "must be later than since")
    return filters


# ---- WHERE clauses ------------------------------------------------------------------------------


def _glob_sql(pattern: str) -> str:
    """fnmatch syntax → SQLite GLOB syntax (only `[!...]` differs)."""
    return pattern.replace("[!", "[^")


def _glob_regex(pattern: str) -> str:
    """fnmatch syntax → an anchored PostgreSQL regular expression."""
    out, i = ["^"], 0
    while i < len(pattern):
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            j = i + (pattern[i : i + 1] == "!")
            j += pattern[j : j + 1] == "]"
            end = pattern.find("]", j)
            if end < 0:
                out.append(r"\[")
                continue
            body = pattern[i:end].replace("\\", r"\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(ch))
    return "".join(out) + "$"


def _model_clause(pattern: str, dialect: str) -> ColumnElement[bool]:
    if not any(ch in pattern for ch in "*?["):
        return or_(c.model == pattern, c.requested_model == pattern)
    if dialect == "sqlite":
        glob = _glob_sql(pattern)
        return or_(c.model.op("GLOB")(glob), c.requested_model.op("GLOB")(glob))
    regex = _glob_regex(pattern)
    return or_(c.model.op("~")(regex), c.requested_model.op("~")(regex))


def where_clauses(filters: Filters, dialect: str) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if filters.model:
        where.append(_model_clause(filters.model, dialect))
    if filters.since is not None:
        where.append(c.started_at >= filters.since)
    if filters.until is not None:
        where.append(c.started_at < filters.until)
    if filters.user is not None:
        where.append(c.user == filters.user)
    for name, value in filters.tags:
        where.append(c.tags[name].as_string() == value)
    if filters.key:
        labelled = select(ApiKey.api_key_hash).where(ApiKey.label == filters.key)
        where.append(or_(c.api_key_hash == key_hash(filters.key), c.api_key_hash.in_(labelled)))
    if filters.outcome is not None:
        where.append(c.outcome == filters.outcome)
    if filters.status is not None:
        where.append(c.status_code == filters.status)
    if filters.stream is not None:
        where.append(c.stream.is_(filters.stream))
    return where


# ---- rows ---------------------------------------------------------------------------------------


def completions_query(filters: Filters, dialect: str) -> Select[Any]:
    return select(completions_table).where(*where_clauses(filters, dialect))


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_json(value: Any, *, indent: bool = False) -> bytes:
    """Rows as JSON: times in RFC 3339 UTC (`Z`), costs as numbers."""
    option = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(value, default=_json_default, option=option)


def row_dict(row: Any, choices: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    data = dict(row._mapping)
    data["choices"] = list(choices)
    return data


async def _choices_for(conn: AsyncConnection, ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    found: dict[int, list[dict[str, Any]]] = {pk: [] for pk in ids}
    if not ids:
        return found
    query = (
        select(choices_table.c.completion_pk, *(choices_table.c[name] for name in CHOICE_COLUMNS))
        .where(choices_table.c.completion_pk.in_(ids))
        .order_by(choices_table.c.completion_pk, choices_table.c.index)
    )
    for row in await conn.execute(query):
        found[row.completion_pk].append({name: getattr(row, name) for name in CHOICE_COLUMNS})
    return found


async def fetch_completions(
    conn: AsyncConnection, filters: Filters, *, limit: int = 20, before_id: int | None = None
) -> list[dict[str, Any]]:
    """Newest first (by id, the order rows were logged), with their choices; limit 0 = all."""
    query = completions_query(filters, conn.dialect.name).order_by(c.id.desc())
    if before_id is not None:
        query = query.where(c.id < before_id)
    if limit:
        query = query.limit(limit)
    rows = (await conn.execute(query)).all()
    choices = await _choices_for(conn, [row.id for row in rows])
    return [row_dict(row, choices[row.id]) for row in rows]


def short_id(request_id: str) -> str:
    """What `logs` prints for a request id: its last 8 characters. Request ids are UUIDv7, whose first 8
    characters are the time and are the same for every call in the same minute; the end is random."""
    return request_id[-8:]


async def fetch_completion(conn: AsyncConnection, ident: str) -> list[dict[str, Any]]:
    """The completion with this request_id, else those with this upstream completion id, else those whose
    request_id ends with `ident` (the short id `logs` prints) or starts with it; newest first. A suffix
    match reads the whole table (no index helps), which an interactive lookup can afford."""
    ident = ident.strip()
    conditions = [c.request_id == ident, c.completion_id == ident]
    if MIN_PREFIX <= len(ident) < 36:
        conditions.append(c.request_id.endswith(ident, autoescape=True))
        conditions.append(c.request_id.startswith(ident, autoescape=True))
    for condition in conditions:
        rows = (await conn.execute(select(completions_table).where(condition).order_by(c.id.desc()))).all()
        if rows:
            choices = await _choices_for(conn, [row.id for row in rows])
            return [row_dict(row, choices[row.id]) for row in rows]
    return []


async def iter_completions(
    engine: AsyncEngine, filters: Filters, *, limit: int = 0, chunk: int = 1000, newest_first: bool = False
) -> AsyncIterator[dict[str, Any]]:
    """Oldest first (or newest), streamed with a server-side cursor in chunks: memory stays flat however
    many rows."""
    async with engine.connect() as conn, engine.connect() as side:
        query = completions_query(filters, conn.dialect.name).order_by(c.id.desc() if newest_first else c.id)
        if limit:
            query = query.limit(limit)
        result = await conn.stream(query.execution_options(yield_per=chunk))
        async for partition in result.partitions():
            choices = await _choices_for(side, [row.id for row in partition])
            for row in partition:
                yield row_dict(row, choices[row.id])


# ---- stats --------------------------------------------------------------------------------------

STAT_FIELDS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost",
    "unknown_cost",
)


@dataclass(slots=True)
class StatsRow:
    key: Any
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: Decimal | None = None
    unknown_cost: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    label: str | None = None
    timed: int = field(default=0, repr=False)

    def add(self, row: Any) -> None:
        if not hasattr(row, "unknown_cost"):
            self.unknown_cost += row.requests - row.priced
        for name in STAT_FIELDS:
            value = getattr(row, name, None)
            if value is None:
                continue
            current = getattr(self, name)
            setattr(self, name, value if current is None else current + value)
        self.timed += row.timed

    def as_dict(self) -> dict[str, Any]:
        data = {"key": self.key}
        if self.label is not None:
            data["label"] = self.label
        data.update({name: getattr(self, name) for name in (*STAT_FIELDS, "p50_ms", "p95_ms")})
        return data


@dataclass(slots=True)
class Stats:
    by: str
    rows: list[StatsRow]
    totals: StatsRow


def _aggregates() -> list[Any]:
    """count() of a nullable column is the cheapest aggregate on SQLite; unknown cost = requests - priced."""
    return [
        func.count().label("requests"),
        func.count(func.nullif(c.outcome, "ok")).label("errors"),
        func.sum(c.prompt_tokens).label("prompt_tokens"),
        func.sum(c.completion_tokens).label("completion_tokens"),
        func.sum(c.cached_tokens).label("cached_tokens"),
        func.sum(c.reasoning_tokens).label("reasoning_tokens"),
        func.sum(c.cost, type_=Money()).label("cost"),
        func.count(c.cost).label("priced"),
        func.count(c.duration_ms).label("timed"),
    ]


def parse_dimension(by: str) -> str:
    if by in DIMENSIONS:
        return by
    if by.startswith("tag:") and by[4:]:
        _tag_key("by", by[4:])
        return by
    raise FilterError("by", f"expected one of {', '.join(DIMENSIONS)} or tag:NAME, got {by!r}")


def _group(by: str, dialect: str) -> tuple[Any, Any]:
    """The grouping expression and the FROM clause it needs."""
    table: Any = completions_table
    if by == "model":
        return func.coalesce(c.model, c.requested_model), table
    if by in ("day", "hour"):
        if dialect == "sqlite":
            return func.strftime("%Y-%m-%d" if by == "day" else "%Y-%m-%d %H:00", c.started_at), table
        moment = func.timezone("UTC", c.started_at)
        return func.to_char(moment, "YYYY-MM-DD" if by == "day" else "YYYY-MM-DD HH24:00"), table
    if by in ("user", "key", "provider", "upstream"):
        column = c.api_key_hash if by == "key" else c[by]
        # SQLite would walk the user/key index to group without sorting, one table lookup per row, even
        # when a time filter leaves a small range: as an expression the index no longer tempts it
        return (column.concat("") if dialect == "sqlite" else column), table
    if by.startswith("tag:"):
        return c.tags[by[4:]].as_string(), table
    if dialect == "sqlite":  # by == "tag": one group per key=value pair
        pairs = func.json_each(case((func.json_type(c.tags) == "object", c.tags))).table_valued(
            "key", "value"
        )
        pairs = pairs.alias("tag_pairs")
        return pairs.c.key + "=" + pairs.c.value, table.outerjoin(pairs, true())
    pairs = func.json_each_text(case((func.json_typeof(c.tags) == "object", c.tags))).table_valued(
        "key", "value"
    )
    pairs = pairs.lateral("tag_pairs")
    return pairs.c.key + "=" + pairs.c.value, table.outerjoin(pairs, true())


def _percentile(values: Mapping[int, float], count: int, p: float) -> float | None:
    """percentile_cont from the 0-based ranks floor(h) and floor(h)+1, h = p * (count - 1)."""
    if count == 0:
        return None
    h = p * (count - 1)
    low = int(h)
    lower = values[low]
    upper = values.get(low + 1, lower)
    return lower + (h - low) * (upper - lower)


def _index_covers(filters: Filters) -> bool:
    """Whether the stats index holds every filtered column (else walking it means a table lookup per row)."""
    return not (
        filters.user
        or filters.tags
        or filters.key
        or filters.status is not None
        or filters.stream is not None
    )


async def fetch_stats(conn: AsyncConnection, by: str, filters: Filters) -> Stats:
    by = parse_dimension(by)
    dialect = conn.dialect.name
    where = where_clauses(filters, dialect)
    key_expr, from_ = _group(by, dialect)
    groups: dict[Any, StatsRow] = {}
    pairs: dict[Any, list[tuple[str | None, str | None, int]]] = {}
    if dialect == "sqlite" and by == "model":
        # grouping by the indexed pair streams; coalesce(model, requested_model) would sort every row
        query = select(c.model, c.requested_model, *_aggregates()).where(*where)
        for row in await conn.execute(query.group_by(c.model, c.requested_model)):
            key = row.model if row.model is not None else row.requested_model
            groups.setdefault(key, StatsRow(key)).add(row)
            pairs.setdefault(key, []).append((row.model, row.requested_model, row.timed))
    else:
        extra = []
        if dialect != "sqlite":
            extra = [
                func.percentile_cont(p).within_group(c.duration_ms).label(f"p{i}")
                for i, p in enumerate(PERCENTILES)
            ]
        query = select(key_expr.label("key"), *_aggregates(), *extra).select_from(from_).where(*where)
        for row in await conn.execute(query.group_by(key_expr)):
            stats = groups[row.key] = StatsRow(row.key)
            stats.add(row)
            if extra:
                stats.p50_ms, stats.p95_ms = row.p0, row.p1
    if dialect == "sqlite" and groups:
        if by == "model" and _index_covers(filters):
            await _model_percentiles(conn, where, groups, pairs)
        else:
            await _window_percentiles(conn, key_expr, from_, where, groups)
    if by == "key":
        await _attach_labels(conn, groups)
    rows = sorted(groups.values(), key=lambda r: (r.cost is None, -(r.cost or 0), -r.requests, str(r.key)))
    return Stats(by, rows, await _totals(conn, by, where, rows))


async def _totals(conn: AsyncConnection, by: str, where: list[Any], rows: list[StatsRow]) -> StatsRow:
    totals = StatsRow("total")
    if by != "tag":
        for row in rows:
            totals.add(row)
        return totals
    # one row can carry several tags: count each row once
    row = (await conn.execute(select(*_aggregates()).where(*where))).one()
    totals.add(row)
    return totals


async def _model_percentiles(
    conn: AsyncConnection,
    where: list[Any],
    groups: dict[Any, StatsRow],
    pairs: dict[Any, list[tuple[str | None, str | None, int]]],
) -> None:
    """For each group and percentile, the two durations around the wanted rank, read with LIMIT 2 OFFSET k
    from the merged index ranges of the group's (model, requested_model) pairs, from the nearer end."""
    pieces: list[Any] = []
    wanted: list[tuple[Any, int, float]] = []
    for key, members in pairs.items():
        count = sum(timed for _, _, timed in members)
        if count == 0:
            continue
        arms = [
            select(c.duration_ms.label("d")).where(
                *where,
                c.model.is_(None) if model is None else c.model == model,
                c.requested_model.is_(None) if requested is None else c.requested_model == requested,
                c.duration_ms.is_not(None),
            )
            for model, requested, timed in members
            if timed
        ]
        if len(arms) > MAX_UNION_ARMS:  # SQLite caps compound selects; sort this group instead
            group = func.coalesce(c.model, c.requested_model)
            arms = [select(c.duration_ms.label("d")).where(*where, group == key, c.duration_ms.is_not(None))]
        source: Any = union_all(*arms).subquery() if len(arms) > 1 else arms[0].subquery()
        for p in PERCENTILES:
            low = int(p * (count - 1))
            from_top = low > count // 2 and count - 2 - low >= 0
            ordered = (
                select(source.c.d)
                .order_by(desc(source.c.d) if from_top else source.c.d)
                .limit(2)
                .offset(count - 2 - low if from_top else low)
                .subquery()
            )
            pieces.append(select(literal(len(wanted)).label("piece"), ordered.c.d))
            wanted.append((key, count, p))
    found: dict[int, list[float]] = {}
    for start in range(0, len(pieces), MAX_UNION_ARMS):  # one round trip per 200 lookups
        chunk = pieces[start : start + MAX_UNION_ARMS]
        query = union_all(*chunk) if len(chunk) > 1 else chunk[0]
        for row in await conn.execute(query):
            found.setdefault(row.piece, []).append(row.d)
    results: dict[Any, dict[float, float | None]] = {}
    for piece, (key, count, p) in enumerate(wanted):
        values = sorted(found.get(piece, ()))
        low = int(p * (count - 1))
        ranks = {low: values[0], low + 1: values[-1]} if values else {}
        results.setdefault(key, {})[p] = _percentile(ranks, count, p) if ranks else None
    for key, by_p in results.items():
        groups[key].p50_ms, groups[key].p95_ms = by_p.get(PERCENTILES[0]), by_p.get(PERCENTILES[1])


async def _window_percentiles(
    conn: AsyncConnection, key_expr: Any, from_: Any, where: list[Any], groups: dict[Any, StatsRow]
) -> None:
    """Rank durations within each group (one sort) and keep only the rows around the wanted ranks."""
    ranked = (
        select(
            key_expr.label("key"),
            c.duration_ms.label("d"),
            func.row_number().over(partition_by=key_expr, order_by=c.duration_ms).label("rn"),
        )
        .select_from(from_)
        .where(*where, c.duration_ms.is_not(None))
        .subquery()
    )
    wanted: set[tuple[Any, int]] = set()
    for key, stats in groups.items():
        for p in PERCENTILES if stats.timed else ():
            low = int(p * (stats.timed - 1))
            wanted.update({(key, low + 1), (key, min(low + 2, stats.timed))})
    if not wanted:
        return
    if len(wanted) <= MAX_WANTED_RANKS:
        known = sorted((pair for pair in wanted if pair[0] is not None), key=repr)
        conditions = [tuple_(ranked.c.key, ranked.c.rn).in_(known)] if known else []
        nulls = sorted(rn for key, rn in wanted if key is None)
        if nulls:
            conditions.append(and_(ranked.c.key.is_(None), ranked.c.rn.in_(nulls)))
        query = select(ranked.c.key, ranked.c.d, ranked.c.rn).where(or_(*conditions))
    else:  # too many groups for one IN list: let SQL find each group's ranks
        counted = select(ranked, func.count().over(partition_by=ranked.c.key).label("n")).subquery()
        lows = [cast((counted.c.n - 1) * literal_column(repr(p)), Integer) for p in PERCENTILES]
        query = select(counted.c.key, counted.c.d, counted.c.rn).where(
            or_(*(counted.c.rn.between(low + 1, low + 2) for low in lows))
        )
    found: dict[Any, dict[int, float]] = {}
    for row in await conn.execute(query):
        found.setdefault(row.key, {})[row.rn - 1] = row.d
    for key, values in found.items():
        if key in groups:
            stats = groups[key]
            stats.p50_ms, stats.p95_ms = (_percentile(values, stats.timed, p) for p in PERCENTILES)


async def _attach_labels(conn: AsyncConnection, groups: dict[Any, StatsRow]) -> None:
    hashes = [key for key in groups if key is not None]
    if not hashes:
        return
    for row in await conn.execute(
        select(ApiKey.api_key_hash, ApiKey.label).where(ApiKey.api_key_hash.in_(hashes))
    ):
        groups[row.api_key_hash].label = row.label


# ---- API keys -----------------------------------------------------------------------------------


async def set_key_label(conn: AsyncConnection, value: str, label: str) -> str:
    """Store fingerprint → label (the key itself is hashed here and never stored); returns the fingerprint."""
    fingerprint = key_hash(value)
    table = ApiKey.__table__
    await conn.execute(table.delete().where(table.c.api_key_hash == fingerprint))
    await conn.execute(
        table.insert().values(api_key_hash=fingerprint, label=label, created_at=datetime.now(UTC))
    )
    return fingerprint


async def key_labels(conn: AsyncConnection) -> list[dict[str, Any]]:
    table = ApiKey.__table__
    usage = (
        select(c.api_key_hash, func.count().label("requests"), func.max(c.started_at).label("last_seen"))
        .group_by(c.api_key_hash)
        .subquery()
    )
    query = (
        select(table.c.api_key_hash, table.c.label, table.c.created_at, usage.c.requests, usage.c.last_seen)
        .select_from(table.outerjoin(usage, usage.c.api_key_hash == table.c.api_key_hash))
        .order_by(table.c.label, table.c.api_key_hash)
    )
    return [{**dict(row._mapping), "requests": row.requests or 0} for row in await conn.execute(query)]
