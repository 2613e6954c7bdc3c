"""The two tables of the outbox and inbox, and the database URLs the relay accepts.

``pigeon_outbox`` holds one row per event waiting to be (or recently) published:
the complete wire message, its ordering ``key``, the relay's lease and, for a
row the relay set aside because no publish can ever carry it, the ``error``
(a column added after the first release: :data:`ERROR_COLUMN`).
``pigeon_inbox`` holds one row per message a listener with ``outbox=`` handled.
Times are epoch seconds (``time.time()``) as floats, the same on every database.
"""

from __future__ import annotations

import base64
import decimal
import json
from datetime import datetime
from typing import Any

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
ERROR_COLUMN = "error"
"""The outbox column added after the first release; tables made before it work
without it (the relay then skips a row it cannot publish only until it restarts)."""


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
        # why the relay set the row aside (the broker can never take it); NULL: publishable
        Column("error", Text),
    )
    pending = box.c.published_at.is_(None)
    Index(f"ix_{outbox}_pending", box.c.id, postgresql_where=pending, sqlite_where=pending)
    Index(f"ix_{outbox}_key", box.c.key, box.c.id)
    Index(f"ix_{outbox}_published_at", box.c.published_at)
    failed = box.c.error.is_not(None)  # the relay skips the keys of these rows each claim
    Index(f"ix_{outbox}_failed", box.c.key, postgresql_where=failed, sqlite_where=failed)
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


CONNECT_TIMEOUT = 10
"""Seconds the relay waits for a database connection: a silent server (a half-open
connection, a dead firewall) must end in an error and a backoff, not a hang."""


def connect_args(url: str | URL) -> dict[str, Any]:
    """The driver's connect timeout for the async form of ``url`` (none for SQLite);
    a libpq ``?connect_timeout=`` in the URL wins (connect_args would override it)."""
    parsed = async_url(url)
    driver = parsed.drivername
    if driver == "postgresql+psycopg":
        return {} if "connect_timeout" in parsed.query else {"connect_timeout": CONNECT_TIMEOUT}
    if driver == "postgresql+asyncpg":
        return {"timeout": CONNECT_TIMEOUT}
    return {}


def listen_dsn(url: URL) -> str:
    """A plain ``postgresql://`` DSN (password included) for asyncpg's LISTEN connection."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


_TAG = "\x00pigeon"
"""The key of a tagged value in the stored headers (a ``\\u0000`` no plain table uses)."""


def dump_headers(headers: dict[str, Any]) -> str:
    """The headers as the JSON of an outbox row, keeping each AMQP type.

    ``bytes``, byte arrays, timestamps and decimals become tagged objects that
    :func:`load_headers` turns back; a table that looks like a tag is wrapped too.
    """
    text = json.dumps(headers, default=_tagged)
    if json.dumps(_TAG)[1:-1] in text:  # rare: a real table carries the tag key
        text = json.dumps(_escape(headers), default=_tagged)
    return text


def load_headers(text: str) -> dict[str, Any]:
    """The headers :func:`dump_headers` stored (plain JSON of older rows reads as is)."""
    loaded: dict[str, Any] = json.loads(text, object_hook=_untagged)
    return loaded


def _tagged(value: Any) -> dict[str, Any]:
    if isinstance(value, bytes):
        return {_TAG: "bytes", "v": base64.b64encode(value).decode()}
    if isinstance(value, bytearray | memoryview):
        return {_TAG: "bytearray", "v": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, datetime):
        return {_TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {_TAG: "decimal", "v": str(value)}
    raise TypeError(f"a header value of type {type(value).__name__} cannot be stored")


def _escape(value: Any) -> Any:
    if isinstance(value, dict):
        inner = {k: _escape(v) for k, v in value.items()}
        return {_TAG: "table", "v": list(inner.items())} if _TAG in value else inner
    if isinstance(value, list | tuple):
        return [_escape(v) for v in value]
    return value


def _untagged(obj: dict[str, Any]) -> Any:
    kind = obj.get(_TAG)
    if kind is None or len(obj) != 2:
        return obj
    value = obj["v"]
    if kind == "bytes":
        return base64.b64decode(value)
    if kind == "bytearray":
        return bytearray(base64.b64decode(value))
    if kind == "datetime":
        return datetime.fromisoformat(value)
    if kind == "decimal":
        return decimal.Decimal(value)
    if kind == "table":
        return {k: v for k, v in value}
    return obj
