"""stats covering index: `stats --by model` and its percentiles read an index, not the table

Grouping by (model, requested_model) streams through this index in order, without sorting; within
each pair the durations are in order, so p50/p95 on SQLite are an index walk (see proxy/store/stats.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATS_COLUMNS = [
    "model",
    "requested_model",
    "duration_ms",
    "started_at",
    "outcome",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost",
]


def upgrade() -> None:
    with op.batch_alter_table("completions") as batch:
        batch.create_index("ix_completions_model_stats", STATS_COLUMNS)


def downgrade() -> None:
    with op.batch_alter_table("completions") as batch:
        batch.drop_index("ix_completions_model_stats")
