"""Filters over logged completions: parsed from query parameters or flags, turned into WHERE clauses.

`logs`, `stats`, `export` and the HTTP API select rows through these, so they agree. Every value a user
supplies reaches SQL as a bound parameter. Parsing raises `FilterError` naming the parameter, so the API
can answer 400 and the CLI can name the flag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.sql.elements import ColumnElement

from ..credentials import key_fingerprint
from ..parse.record import APIS, OUTCOMES
from .models import ApiKey, completions_table

c = completions_table.c
FILTER_PARAMS = ("model", "since", "until", "user", "tag", "key", "outcome", "status", "stream", "api")
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
    api: str | None = None


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
    api = one("api")
    if api is not None and api not in APIS:
        raise FilterError("api", f"expected one of {', '.join(APIS)}, got {api!r}")
    outcome = one("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise FilterError("outcome", f"expected one of {', '.join(OUTCOMES)}, got {outcome!r}")
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
        outcome=outcome,
        status=int(status) if status is not None else None,
        stream=stream.lower() in ("true", "1", "yes") if stream is not None else None,
        api=api,
    )
    if filters.since and filters.until and filters.since >= filters.until:
        raise FilterError("until", "must be later than since")
    return filters


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


def model_matches(pattern: str, dialect: str, model: Any = c.model, requested: Any = c.requested_model) -> list[Any]:
    """Whether each of the two model columns matches the name or fnmatch glob `pattern`."""
    if not any(ch in pattern for ch in "*?["):
        return [model == pattern, requested == pattern]
    if dialect == "sqlite":
        glob = _glob_sql(pattern)
        return [model.op("GLOB")(glob), requested.op("GLOB")(glob)]
    regex = _glob_regex(pattern)
    return [model.op("~")(regex), requested.op("~")(regex)]


def key_matches(key: str, column: Any = c.api_key_hash) -> ColumnElement[bool]:
    """A key given as itself, its fingerprint or its label."""
    labelled = select(ApiKey.api_key_hash).where(ApiKey.label == key)
    return or_(column == key_hash(key), column.in_(labelled))


def where_clauses(filters: Filters, dialect: str) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if filters.model:
        where.append(or_(*model_matches(filters.model, dialect)))
    if filters.since is not None:
        where.append(c.started_at >= filters.since)
    if filters.until is not None:
        where.append(c.started_at < filters.until)
    if filters.user is not None:
        where.append(c.user == filters.user)
    for name, value in filters.tags:
        where.append(c.tags[name].as_string() == value)
    if filters.key:
        where.append(key_matches(filters.key))
    if filters.outcome is not None:
        where.append(c.outcome == filters.outcome)
    if filters.status is not None:
        where.append(c.status_code == filters.status)
    if filters.api is not None:
        where.append(c.api == filters.api)
    if filters.stream is not None:
        where.append(c.stream.is_(filters.stream))
    return where
