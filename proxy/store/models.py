"""The ledger's schema: typed SQLAlchemy models, the one source every column list is derived from.

Table and column names are a public interface (users query them with plain SQL): keep them. Migrations
(migrations/versions) bring a database to this schema; tests/test_migrations.py checks they agree.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .histogram import BUCKET_COLUMNS
from .rollups import MEASURES, ROLLUP_SPECS, TAG_SPECS
from .types import Money, UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BigIntPK = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Completion(Base):
    """One proxied call (a chat completion, or any call when logging.all_paths is on)."""

    __tablename__ = "completions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    upstream: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32), index=True)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    requested_model: Mapped[str | None] = mapped_column(Text)
    completion_id: Mapped[str | None] = mapped_column(Text)
    object: Mapped[str | None] = mapped_column(Text)
    created: Mapped[int | None] = mapped_column(BigInteger)
    model: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(Text)
    system_fingerprint: Mapped[str | None] = mapped_column(Text)
    service_tier: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(BigInteger)
    completion_tokens: Mapped[int | None] = mapped_column(BigInteger)
    total_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cached_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cache_write_tokens: Mapped[int | None] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cost: Mapped[Decimal | None] = mapped_column(Money)
    cost_source: Mapped[str | None] = mapped_column(String(16))
    usage: Mapped[Any | None] = mapped_column(JSON(none_as_null=True))
    api_key_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    user: Mapped[str | None] = mapped_column(Text, index=True)
    tags: Mapped[Any | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[str | None] = mapped_column(Text)
    upstream_request_id: Mapped[str | None] = mapped_column(Text)
    api: Mapped[str | None] = mapped_column(String(16))  # chat, responses, embeddings, completions, messages
    # hours since the Unix epoch (UTC) of started_at: leads the completion_id index so inserts append
    started_hour: Mapped[int | None] = mapped_column(Integer)

    choices: Mapped[list[CompletionChoice]] = relationship(
        back_populates="completion", order_by="CompletionChoice.index", lazy="raise"
    )

    __table_args__ = (
        Index("ix_completions_model_started_at", "model", "started_at"),
        Index("ix_completions_requested_model", "requested_model"),
        Index("ix_completions_started_hour_completion_id", "started_hour", "completion_id"),
    )


class CompletionChoice(Base):
    """One choice of a completion (n>1 gives several); finish reasons are what audits filter on."""

    __tablename__ = "completion_choices"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    completion_pk: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("completions.id", ondelete="CASCADE"), index=True
    )
    index: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(Text)
    native_finish_reason: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str | None] = mapped_column(Text)

    completion: Mapped[Completion] = relationship(back_populates="choices")


class Price(Base):
    """A model's price from `effective_from` on, in USD per million tokens (history is kept)."""

    __tablename__ = "prices"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(Text)
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime)
    prompt: Mapped[Decimal] = mapped_column(Money)
    completion: Mapped[Decimal] = mapped_column(Money)
    cache_read: Mapped[Decimal | None] = mapped_column(Money)
    cache_write: Mapped[Decimal | None] = mapped_column(Money)
    reasoning: Mapped[Decimal | None] = mapped_column(Money)
    source: Mapped[str] = mapped_column(String(32))

    __table_args__ = (UniqueConstraint("model", "effective_from", "source"),)


class ApiKey(Base):
    """A human label for a key fingerprint; the key itself is never stored."""

    __tablename__ = "api_keys"

    api_key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LedgerMeta(Base):
    """Facts about the ledger itself (such as how far it has been pruned), one value per key."""

    __tablename__ = "ledger_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def _rollup_table(name: str, period: str, dimensions: tuple[str, ...], *, null_dims: bool = True) -> Table:
    """A rollup table: one row per (period, dimension values, null_dims) with its sums and duration histogram.

    Dimensions hold '' where the rows' value is NULL, and `null_dims` has bit i set when DIMENSIONS[i]
    was NULL, so the key never holds a NULL and '' stays apart from NULL.
    """
    zero = text("0")
    return Table(
        name,
        Base.metadata,
        Column(period, Integer, primary_key=True),
        *(Column(dimension, Text, primary_key=True) for dimension in dimensions),
        *([Column("null_dims", Integer, primary_key=True)] if null_dims else []),
        *(Column(measure, BigInteger, nullable=False, server_default=zero) for measure in MEASURES),
        *(Column(bucket, Integer, nullable=False, server_default=zero) for bucket in BUCKET_COLUMNS),
    )


# Sums per hour (hours since the Unix epoch, UTC, as completions.started_hour) and per day (days since the
# epoch): usage_hourly with every dimension, and narrower families (rollups.ROLLUP_TABLES) that answer most
# queries from far fewer rows.
ROLLUP_TABLES: tuple[Table, ...] = tuple(
    _rollup_table(spec.name, spec.period, spec.dimensions) for spec in ROLLUP_SPECS
)
usage_hourly_table = ROLLUP_TABLES[0]
# per tag pair: (hour or day, tag, value); a call counts under each of its pairs, one without tags under
# ('', '') (rollups.NO_TAGS)
TAG_TABLES: tuple[Table, ...] = tuple(
    _rollup_table(spec.name, spec.period, spec.dimensions, null_dims=False) for spec in TAG_SPECS
)

completions_table = Completion.__table__
choices_table = CompletionChoice.__table__
