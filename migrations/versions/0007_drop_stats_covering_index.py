"""drop the stats covering index: the rollups answer `stats --by model`

ix_completions_model_stats let `stats --by model` read an index instead of the table. The rollup tables
(0006) answer that query now, from a few thousand rows; the index only cost every insert a page write
and the ledger its size. `stats --exact` reads the rows through the (model, started_at) index instead.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_completions_model_stats"
COLUMNS = [
    "model",
    "requested_model",
    "started_at",
    "duration_ms",
    "outcome",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost",
]


def upgrade() -> None:
    op.drop_index(INDEX, table_name="completions")


def downgrade() -> None:
    op.create_index(INDEX, "completions", COLUMNS)
