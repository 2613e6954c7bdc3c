"""Alembic environment: migrations run on LetterThief's own connection at start.

:meth:`letterthief.store.Store.open` hands its connection in through
``config.attributes["connection"]``. Run by hand (``alembic -x url=...``) it
opens its own async engine.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from letterthief.models import Base
from letterthief.settings import LetterThiefSettings, async_database_url

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    return async_database_url(url or LetterThiefSettings().database_url)


async def _online() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


shared = config.attributes.get("connection")
if shared is not None:
    _run(shared)
elif context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_online())
