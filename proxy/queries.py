"""Filters and reads over logged completions: the module the CLI and the HTTP API query through (the
aggregates of `stats` are in proxy/stats.py).

Every value a user supplies reaches SQL as a bound parameter. Filter parsing raises `FilterError`
naming the parameter, so the API can answer 400 and the CLI can name the flag.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import (
    Select,
    func,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from .db import ApiKey, choices_table, completions_table
from .request_facts import key_fingerprint

c = completions_table.c
COLUMNS = tuple(completions_table.c.keys())
CHOICE_COLUMNS = ("index", "finish_reason", "native_finish_reason", "role")
FILTER_PARAMS = ("model", "since", "until", "user", "tag", "key", "outcome", "status", "stream")
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


def tag_key(param: str, key: str) -> str:
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
        tags.append((tag_key("tag", name.strip()), value.strip()))
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
