"""the rollup tables: per-group sums and duration histograms per hour and per day, filled from the rows

usage_hourly holds every dimension (model, requested_model, api, upstream, provider, api_key_hash, user,
outcome). Narrower families, each a table per hour and one per day, answer most queries from far fewer
rows: _totals (no dimension), _models (model, requested_model), _keys (api_key_hash), _routes (model,
requested_model, api, upstream, provider, outcome) and _users (user); usage_hourly_tags and
usage_daily_tags count each call under each of its tag pairs (tag, value), a call without tags under
('', ''). Each row holds its group's requests, errors, tokens, cost (an integer of pico-USD) and a
56-bucket histogram of durations.
Dimensions hold '' for NULL; null_dims has bit i set when dimension i of the full list was NULL. The
existing rows are summed into them here; the writer keeps them current from then on.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DIMENSIONS = ("model", "requested_model", "api", "upstream", "provider", "api_key_hash", "user", "outcome")
MODEL_DIMENSIONS = ("model", "requested_model", "api", "upstream", "provider", "outcome")
NARROW = (  # (table, period, dimensions): the families of narrower tables, summed from usage_hourly
    ("usage_hourly_totals", "hour", ()),
    ("usage_daily_totals", "day", ()),
    ("usage_hourly_models", "hour", ("model", "requested_model")),
    ("usage_daily_models", "day", ("model", "requested_model")),
    ("usage_hourly_keys", "hour", ("api_key_hash",)),
    ("usage_daily_keys", "day", ("api_key_hash",)),
    ("usage_hourly_routes", "hour", MODEL_DIMENSIONS),
    ("usage_daily_routes", "day", MODEL_DIMENSIONS),
    ("usage_hourly_users", "hour", ("user",)),
    ("usage_daily_users", "day", ("user",)),
)
TOKENS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
MEASURES = ("requests", "errors", *TOKENS, "priced", "timed", "cost_pusd")
BUCKETS = 56
BUCKET_COLUMNS = tuple(f"h{i:02d}" for i in range(BUCKETS))
VALUES = (*MEASURES, *BUCKET_COLUMNS)
# bucket 0: under 5 ms; bucket i: from 5 * 1.3**(i-1) ms; bound as parameters, so the database compares
# with the very doubles the writer bisects
BOUND_PARAMS = {f"b{i}": 5.0 * 1.3 ** (i - 1) for i in range(1, BUCKETS)}


def _q(name: str) -> str:
    return f'"{name}"'


def _create(name: str, period: str, dimensions: Sequence[str], *, null_dims: bool = True) -> None:
    zero = sa.text("0")
    keys = [period, *dimensions, *(["null_dims"] if null_dims else [])]
    op.create_table(
        name,
        sa.Column(period, sa.Integer(), nullable=False),
        *(sa.Column(dimension, sa.Text(), nullable=False) for dimension in dimensions),
        *([sa.Column("null_dims", sa.Integer(), nullable=False)] if null_dims else []),
        *(sa.Column(measure, sa.BigInteger(), nullable=False, server_default=zero) for measure in MEASURES),
        *(sa.Column(bucket, sa.Integer(), nullable=False, server_default=zero) for bucket in BUCKET_COLUMNS),
        sa.PrimaryKeyConstraint(*keys, name=op.f(f"pk_{name}")),
    )


def _bucket_case(low: int, high: int) -> str:
    if low == high:
        return str(low)
    middle = (low + high + 1) // 2
    return (
        f"CASE WHEN duration_ms < :b{middle} THEN {_bucket_case(low, middle - 1)} "
        f"ELSE {_bucket_case(middle, high)} END"
    )


def _measures(dialect: str) -> tuple[str, str]:
    if dialect == "sqlite":
        pico = "CAST(ROUND(cost * 1000000000000.0) AS INTEGER)"
    else:
        pico = "CAST(cost * 1000000000000 AS BIGINT)"
    inner = ", ".join(
        [
            "COUNT(*) AS requests",
            *(f"COALESCE(SUM({name}), 0) AS {name}" for name in TOKENS),
            "COUNT(cost) AS priced",
            "COUNT(duration_ms) AS timed",
            f"COALESCE(SUM({pico}), 0) AS cost_pusd",
        ]
    )
    outer = ", ".join(
        [
            "SUM(requests)",
            "SUM(CASE WHEN outcome = 'ok' THEN 0 ELSE requests END)",
            *(f"SUM({name})" for name in TOKENS),
            "SUM(priced)",
            "SUM(timed)",
            "SUM(cost_pusd)",
            *(f"SUM(CASE WHEN b = {i} THEN timed ELSE 0 END)" for i in range(BUCKETS)),
        ]
    )
    return inner, outer


def _hourly_sql(dialect: str) -> str:
    dims = ", ".join(map(_q, DIMENSIONS))
    inner, outer = _measures(dialect)
    empty_for_null = ", ".join(f"COALESCE({_q(name)}, '')" for name in DIMENSIONS)
    null_dims = " + ".join(
        f"CASE WHEN {_q(name)} IS NULL THEN {1 << i} ELSE 0 END" for i, name in enumerate(DIMENSIONS)
    )
    columns = ", ".join(map(_q, ("hour", *DIMENSIONS, "null_dims", *VALUES)))
    return (
        f"INSERT INTO usage_hourly ({columns}) SELECT started_hour, {empty_for_null}, {null_dims}, {outer} FROM ("
        f"SELECT started_hour, {dims}, {_bucket_case(0, BUCKETS - 1)} AS b, {inner} "
        f"FROM completions WHERE started_hour IS NOT NULL GROUP BY started_hour, {dims}, b) AS g "
        f"GROUP BY started_hour, {dims}"
    )


def _hourly_tags_sql(dialect: str) -> str:
    """Each row under each of its tag pairs; a row without tags under ('', '')."""
    inner, outer = _measures(dialect)
    if dialect == "sqlite":
        pairs = "LEFT JOIN json_each(CASE WHEN json_type(tags) = 'object' THEN tags END) AS t"
    else:
        pairs = "LEFT JOIN LATERAL json_each_text(CASE WHEN json_typeof(tags) = 'object' THEN tags END) AS t ON true"
    columns = ", ".join(map(_q, ("hour", "tag", "value", *VALUES)))
    return (
        f"INSERT INTO usage_hourly_tags ({columns}) SELECT started_hour, tag, value, {outer} FROM ("
        f"SELECT started_hour, COALESCE(t.key, '') AS tag, COALESCE(t.value, '') AS value, outcome, "
        f"{_bucket_case(0, BUCKETS - 1)} AS b, {inner} "
        f"FROM completions {pairs} WHERE started_hour IS NOT NULL "
        f"GROUP BY started_hour, tag, value, outcome, b) AS g "
        f"GROUP BY started_hour, tag, value"
    )


def _from_hourly_sql(table: str, period: str, dimensions: Sequence[str]) -> str:
    """A family's hourly table from usage_hourly; its daily table from its hourly one."""
    mask = sum(1 << DIMENSIONS.index(name) for name in dimensions)
    keys = ", ".join(["hour" if period == "hour" else "hour / 24", *map(_q, dimensions), f"null_dims & {mask}"])
    columns = ", ".join(map(_q, (period, *dimensions, "null_dims", *VALUES)))
    sums = ", ".join(f"SUM({_q(name)})" for name in VALUES)
    source = "usage_hourly" if period == "hour" else table.replace("usage_daily", "usage_hourly")
    return f"INSERT INTO {table} ({columns}) SELECT {keys}, {sums} FROM {source} GROUP BY {keys}"


def upgrade() -> None:
    _create("usage_hourly", "hour", DIMENSIONS)
    for name, period, dimensions in NARROW:
        _create(name, period, dimensions)
    _create("usage_hourly_tags", "hour", ("tag", "value"), null_dims=False)
    _create("usage_daily_tags", "day", ("tag", "value"), null_dims=False)
    bind = op.get_bind()
    bind.execute(sa.text(_hourly_sql(bind.dialect.name)), BOUND_PARAMS)
    for name, period, dimensions in NARROW:
        bind.execute(sa.text(_from_hourly_sql(name, period, dimensions)))
    bind.execute(sa.text(_hourly_tags_sql(bind.dialect.name)), BOUND_PARAMS)
    sums = ", ".join(f"SUM({_q(name)})" for name in VALUES)
    bind.execute(
        sa.text(
            f"INSERT INTO usage_daily_tags ({', '.join(map(_q, ('day', 'tag', 'value', *VALUES)))}) "
            f"SELECT hour / 24, tag, value, {sums} FROM usage_hourly_tags GROUP BY hour / 24, tag, value"
        )
    )


def downgrade() -> None:
    op.drop_table("usage_daily_tags")
    op.drop_table("usage_hourly_tags")
    for name, _, _ in reversed(NARROW):
        op.drop_table(name)
    op.drop_table("usage_hourly")
