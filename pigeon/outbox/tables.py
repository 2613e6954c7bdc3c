"""The two tables of the outbox and inbox, and the database URLs the relay accepts.

``pigeon_outbox`` holds one row per event waiting to be (or recently) published:
the complete wire message, its ordering ``key`` and the relay's lease.
``pigeon_inbox`` holds one row per message a listener with ``outbox=`` handled.
Times are epoch seconds (``time.time()``) as floats, the same on every database.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import URL, make_url

from pigeon.errors import ConfigurationError

OUTBOX_TABLE = "pigeon_outbox"
INBOX_TABLE = "pigeon_inbox"


def make_tables(
    outbox: str = OUTBOX_TABLE, inbox: str = INBOX_TABLE
) -> tuple[MetaData, Table, Table]:
    """A fresh ``MetaData`` with the outbox and inbox tables under these names.

    Pass the ``MetaData`` to Alembic's ``target_metadata`` (next to your own)
    to have the tables in your migrations.
    """
    metadata = MetaData()
    box = Table(
        outbox,
        metadata,
        Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
        Column("message_id", String(255), nullable=False, unique=True),
        Column("key", String(255), nullable=False),
        Column("exchange", String(255), nullable=False),
        Column("routing_key", String(255), nullable=False),
        Column("event_name", String(255), nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("headers", Text, nullable=False),
        Column("correlation_id", String(255)),
        Column("app_id", String(255)),
        Column("content_type", String(255), nullable=False),
        Column("content_encoding", String(64)),
        Column("created_at", Float(precision=53), nullable=False),
        Column("published_at", Float(precision=53)),
        Column("claimed_by", String(128)),
        Column("claimed_until", Float(precision=53)),
    )
    pending = box.c.published_at.is_(None)
    Index(f"ix_{outbox}_pending", box.c.id, postgresql_where=pending, sqlite_where=pending)
    Index(f"ix_{outbox}_key", box.c.key, box.c.id)
    Index(f"ix_{outbox}_published_at", box.c.published_at)
    inbox_table = Table(
        inbox,
        metadata,
        Column("queue", String(255), primary_key=True),
        Column("message_id", String(255), primary_key=True),
        Column("created_at", Float(precision=53), nullable=False),
    )
    Index(f"ix_{inbox}_created_at", inbox_table.c.created_at)
    return metadata, box, inbox_table


_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "postgresql+psycopg2": "postgresql+psycopg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


def async_url(url: str | URL) -> URL:
    """The asyncio form of a database URL (what the relay connects with).

    ``sqlite:///path`` → aiosqlite; ``postgresql://`` and ``postgresql+psycopg://``
    → psycopg 3 in async mode; ``postgresql+asyncpg://`` stays. Anything else
    raises :class:`ConfigurationError` naming the forms that work.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ConfigurationError(
            f"the outbox cannot use a {parsed.drivername!r} database; use "
            "postgresql+psycopg://, postgresql+asyncpg:// or sqlite:///path"
        )
    return parsed.set(drivername=driver)


def listen_dsn(url: URL) -> str:
    """A plain ``postgresql://`` DSN (password included) for asyncpg's LISTEN connection."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)
