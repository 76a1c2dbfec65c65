"""Human labels for API key fingerprints (`chatledger keys`); the key itself is hashed and never stored."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from .filters import key_hash
from .models import ApiKey, completions_table

c = completions_table.c


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
