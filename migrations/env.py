"""Alembic environment (async). The URL comes from chatledger's config, not from an ini file.

`proxy.migrate` passes an open connection in `config.attributes["connection"]`, so migrations can run
inside an already running event loop; the alembic command line gets its URL from
CHATLEDGER_DATABASE_URL or the default.
"""

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from proxy.config import DEFAULT_DATABASE_URL, normalize_database_url
from proxy.store.engine import create_engine
from proxy.store.models import Base

target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    import os

    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get("CHATLEDGER_DATABASE_URL")
    return normalize_database_url(url or DEFAULT_DATABASE_URL)


async def _run_online() -> None:
    engine = create_engine(_url())
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_configure)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    shared = context.config.attributes.get("connection")
    if shared is not None:
        _configure(shared)
    else:
        asyncio.run(_run_online())
