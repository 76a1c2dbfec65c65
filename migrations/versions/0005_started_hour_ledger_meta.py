"""completions.started_hour leads the completion_id index; ledger_meta holds the ledger's own facts

A random completion id lands at a random place in a plain completion_id index, so at millions of rows
every insert dirties an index page that is no longer cached. Led by the hour the call started
(hours since the Unix epoch, UTC), new entries append to the current hour's range; a lookup by
completion id probes each hour. ledger_meta is a key/value table for facts such as the prune horizon.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("completions") as batch:
        batch.add_column(sa.Column("started_hour", sa.Integer(), nullable=True))
    if op.get_bind().dialect.name == "sqlite":
        op.execute("UPDATE completions SET started_hour = CAST(strftime('%s', started_at) AS INTEGER) / 3600")
    else:
        op.execute("UPDATE completions SET started_hour = floor(extract(epoch FROM started_at) / 3600)")
    with op.batch_alter_table("completions") as batch:
        batch.drop_index("ix_completions_completion_id")
        batch.create_index("ix_completions_started_hour_completion_id", ["started_hour", "completion_id"])
    op.create_table(
        "ledger_meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_ledger_meta")),
    )


def downgrade() -> None:
    op.drop_table("ledger_meta")
    with op.batch_alter_table("completions") as batch:
        batch.drop_index("ix_completions_started_hour_completion_id")
        batch.create_index("ix_completions_completion_id", ["completion_id"])
        batch.drop_column("started_hour")
