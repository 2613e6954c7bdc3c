"""Databases for the outbox tests: one PostgreSQL database per test session, SQLite files.

The PostgreSQL database is named ``pigeon_outbox_<random>`` and dropped at the
end of the session; every test uses its own table names inside it, so tests
never see each other's rows.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Column, Integer, MetaData, String, Table

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_HOST = "postgres@127.0.0.1:5432"


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh, uniquely named database; yields its name and drops it afterwards."""
    name = f"pigeon_outbox_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def pg_name() -> Iterator[str]:
    with pg_database() as name:
        yield name


def pg_url(name: str, driver: str = "psycopg") -> str:
    return f"postgresql+{driver}://{PG_HOST}/{name}"


def effects_table(prefix: str) -> tuple[MetaData, Table]:
    """``fx_<prefix>``: one row per handled event; no unique constraint, so a second
    effect of one message shows up as a second row."""
    metadata = MetaData()
    table = Table(
        f"fx_{prefix}",
        metadata,
        Column("message_id", String(255), nullable=False),
        Column("seq", Integer, nullable=False),
    )
    return metadata, table
