"""completions.api: which API a row's call used (chat, responses, embeddings, completions, messages)

Rows logged before this revision are chat completions, except calls on other paths logged with
`[logging] all_paths`: those keep NULL.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("completions") as batch:
        batch.add_column(sa.Column("api", sa.String(length=16), nullable=True))
    op.execute(
        "UPDATE completions SET api = 'chat' WHERE method = 'POST' "
        "AND (path LIKE '%/chat/completions' OR path LIKE '%/chat/completions?%')"
    )


def downgrade() -> None:
    with op.batch_alter_table("completions") as batch:
        batch.drop_column("api")
