"""stats covering index in append order: (model, requested_model, started_at, duration_ms, ...)

0002 put duration_ms third, so every insert landed at a random place within its model's range and, once
the index outgrew a commit's worth of rows, dirtied a page of its own (SQLite writes every dirtied page to
the WAL at each commit, then again at the checkpoint). With started_at third, new rows go to the end of
their (model, requested_model) range. `stats --by model` still reads only this index; its SQLite
percentiles sort each pair's durations instead of walking them in order (see proxy/store/stats.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_completions_model_stats"
MEASURES = ["outcome", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "cost"]
APPEND_ORDER = ["model", "requested_model", "started_at", "duration_ms", *MEASURES]
DURATION_ORDER = ["model", "requested_model", "duration_ms", "started_at", *MEASURES]  # 0002's


def upgrade() -> None:
    op.drop_index(INDEX, table_name="completions")
    op.create_index(INDEX, "completions", APPEND_ORDER)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="completions")
    op.create_index(INDEX, "completions", DURATION_ORDER)
