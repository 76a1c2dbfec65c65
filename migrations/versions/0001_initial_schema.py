"""initial schema: completions, completion_choices, prices, api_keys

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def Timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def Money() -> sa.Numeric:
    return sa.Numeric(24, 12, asdecimal=False)


def upgrade() -> None:
    op.create_table(
        "completions",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("started_at", Timestamp(), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("upstream", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("requested_model", sa.Text(), nullable=True),
        sa.Column("completion_id", sa.Text(), nullable=True),
        sa.Column("object", sa.Text(), nullable=True),
        sa.Column("created", sa.BigInteger(), nullable=True),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("provider", sa.Text(), nullable=True),
        sa.Column("system_fingerprint", sa.Text(), nullable=True),
        sa.Column("service_tier", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=True),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=True),
        sa.Column("total_tokens", sa.BigInteger(), nullable=True),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=True),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=True),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=True),
        sa.Column("cost", Money(), nullable=True),
        sa.Column("cost_source", sa.String(16), nullable=True),
        sa.Column("usage", sa.JSON(), nullable=True),
        sa.Column("api_key_hash", sa.String(64), nullable=True),
        sa.Column("user", sa.Text(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("upstream_request_id", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_completions")),
        sa.UniqueConstraint("request_id", name=op.f("uq_completions_request_id")),
    )
    with op.batch_alter_table("completions") as batch:
        batch.create_index(batch.f("ix_completions_started_at"), ["started_at"])
        batch.create_index(batch.f("ix_completions_completion_id"), ["completion_id"])
        batch.create_index(batch.f("ix_completions_outcome"), ["outcome"])
        batch.create_index(batch.f("ix_completions_api_key_hash"), ["api_key_hash"])
        batch.create_index(batch.f("ix_completions_user"), ["user"])
        batch.create_index("ix_completions_model_started_at", ["model", "started_at"])
        batch.create_index("ix_completions_requested_model", ["requested_model"])

    op.create_table(
        "completion_choices",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("completion_pk", sa.BigInteger(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("finish_reason", sa.Text(), nullable=True),
        sa.Column("native_finish_reason", sa.Text(), nullable=True),
        sa.Column("role", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["completion_pk"],
            ["completions.id"],
            name=op.f("fk_completion_choices_completion_pk_completions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_completion_choices")),
    )
    with op.batch_alter_table("completion_choices") as batch:
        batch.create_index(batch.f("ix_completion_choices_completion_pk"), ["completion_pk"])

    op.create_table(
        "prices",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("effective_from", Timestamp(), nullable=False),
        sa.Column("prompt", Money(), nullable=False),
        sa.Column("completion", Money(), nullable=False),
        sa.Column("cache_read", Money(), nullable=True),
        sa.Column("cache_write", Money(), nullable=True),
        sa.Column("reasoning", Money(), nullable=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prices")),
        sa.UniqueConstraint("model", "effective_from", "source", name=op.f("uq_prices_model")),
    )

    op.create_table(
        "api_keys",
        sa.Column("api_key_hash", sa.String(64), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("api_key_hash", name=op.f("pk_api_keys")),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("prices")
    op.drop_table("completion_choices")
    op.drop_table("completions")
