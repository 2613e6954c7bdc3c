"""SQLite: the inbox transactions of one process take turns for the write lock.

On SQLite an inbox transaction holds the database's write lock from its inbox
insert to its commit, that is while its handler runs. Left to the driver,
concurrent handlers queue in SQLite's busy handler, which gives up after the
driver's busy timeout (5 s for pysqlite and aiosqlite) with "database is
locked": ten 1 s handlers, and the last ones were retried or dead-lettered for
waiting their turn. Here the inbox transactions of one process on one database
file wait for their turn in a lock of their own, as long as their listener's
timeout lets them; SQLite's busy timeout is left to the contention with other
processes and with the relay's short claims.

Should the busy timeout run out all the same (another process held the lock
longer), the message is tried again later without spending an attempt
(``RetryLater(counts=False)``): waiting for a lock is never a reason to
dead-letter it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import AsyncIterator, Iterator

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from pigeon.retry import RetryLater

LOCKED_RETRY = 1.0
"""Seconds before a message whose transaction found the database locked is tried again."""

_guard = threading.Lock()
_thread_locks: dict[str, threading.Lock] = {}
_loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.contextmanager
def write_turn(engine: Engine | AsyncEngine) -> Iterator[None]:
    """Around a sync inbox transaction: on SQLite, wait for this process's turn first."""
    database = _database(engine)
    if database is None:
        yield
        return
    with _guard:
        lock = _thread_locks.setdefault(database, threading.Lock())
    with lock, _locked_is_retry():
        yield


@contextlib.asynccontextmanager
async def write_turn_async(engine: Engine | AsyncEngine) -> AsyncIterator[None]:
    """The asyncio form of :func:`write_turn` (one lock per event loop and database)."""
    database = _database(engine)
    if database is None:
        yield
        return
    locks = _loop_locks.setdefault(asyncio.get_running_loop(), {})
    async with locks.setdefault(database, asyncio.Lock()):
        with _locked_is_retry():
            yield


def _database(engine: Engine | AsyncEngine) -> str | None:
    """The SQLite database ``engine`` writes to (None on other databases)."""
    if engine.dialect.name != "sqlite":
        return None
    path = engine.url.database  # never in-memory: Outbox refuses that
    return os.path.abspath(path) if path else None


@contextlib.contextmanager
def _locked_is_retry() -> Iterator[None]:
    try:
        yield
    except DBAPIError as exc:
        if not _locked(exc.orig):
            raise
        raise RetryLater(
            LOCKED_RETRY,
            "the SQLite database stayed locked by another connection; tried again later",
            counts=False,
        ) from exc


def _locked(error: BaseException | None) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): "database is locked"."""
    if not isinstance(error, sqlite3.Error):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "is locked" in str(error)
