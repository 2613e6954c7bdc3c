"""An idempotency store in a SQLite file, the default: no server, no extra dependency.

Several listener processes on one host can share the file. Every claim is a
single ``INSERT ... ON CONFLICT DO UPDATE ... WHERE ... RETURNING`` statement,
which SQLite runs under its one write lock, so of many concurrent claimers
exactly one wins. The file is in WAL mode, so readers never block the writer.

Operations are group-committed: whatever callers asked for while the store's
thread was busy runs in the next single transaction, and each caller gets its
answer only after that transaction committed. Under load one commit serves
dozens of messages; alone, a call costs one transaction as before.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pigeon.idempotency.base import (
    OUTCOME_SUFFIX,
    Claim,
    ClaimState,
    IdempotencyStore,
    new_token,
)

_T = TypeVar("_T")

BUSY_TIMEOUT_MS = 30_000

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pigeon_idempotency ("
    " key TEXT PRIMARY KEY, state TEXT NOT NULL, token TEXT, expires_at REAL NOT NULL"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS pigeon_idempotency_expires_at ON pigeon_idempotency (expires_at)",
)
_CLAIM = (
    "INSERT INTO pigeon_idempotency (key, state, token, expires_at) VALUES (?, 'claimed', ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET"
    " state = 'claimed', token = excluded.token, expires_at = excluded.expires_at"
    " WHERE pigeon_idempotency.expires_at <= ? RETURNING token"
)
_EXTEND = (
    "UPDATE pigeon_idempotency SET expires_at = ?"
    " WHERE key = ? AND token = ? AND state = 'claimed' AND expires_at > ?"
)
_LOOKUP = "SELECT state, expires_at, token FROM pigeon_idempotency WHERE key = ?"
_RECORD = (
    "INSERT INTO pigeon_idempotency (key, state, token, expires_at) VALUES (?, 'outcome', ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET"
    " state = 'outcome', token = excluded.token, expires_at = excluded.expires_at"
)
_RECORDED = (
    "SELECT token FROM pigeon_idempotency WHERE key = ? AND state = 'outcome' AND expires_at > ?"
)
_DONE = (
    "INSERT INTO pigeon_idempotency (key, state, token, expires_at) VALUES (?, 'done', ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET"
    " state = 'done', token = excluded.token, expires_at = excluded.expires_at"
)
_RELEASE = "DELETE FROM pigeon_idempotency WHERE key = ? AND token = ? AND state = 'claimed'"
_PURGE = "DELETE FROM pigeon_idempotency WHERE expires_at <= ?"


class SQLiteStore(IdempotencyStore):
    """Keys in table ``pigeon_idempotency`` of the SQLite file at ``path``.

    The blocking sqlite3 calls run on one dedicated thread that owns the
    connection, so the event loop never waits on disk or on another process's
    write lock. Expiry uses wall-clock UTC seconds (``time.time()``), which all
    processes on the host share. Writers wait up to ``BUSY_TIMEOUT_MS`` for the
    lock before ``sqlite3.OperationalError: database is locked`` is raised.
    With ``synchronous=NORMAL`` a crashed process loses nothing; a power cut
    may lose the last few done marks, so those messages would run again.
    """

    def __init__(self, path: str | Path, *, retention: float = 7 * 24 * 3600) -> None:
        super().__init__(retention=retention)
        self.path = Path(path)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._draining = False

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pigeon-idempotency-sqlite")
        try:
            await self._run(self._connect)
        except BaseException:
            self._executor.submit(self._disconnect)
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        executor = self._executor
        if executor is None:
            return
        try:
            await self._run(self._disconnect)
        finally:
            self._executor = None
            executor.shutdown(wait=True)

    async def claim(self, key: str, lease: float) -> Claim:
        claim: Claim = await self._batched(self._claim, key, lease)
        return claim

    async def extend(self, key: str, token: str, lease: float) -> bool:
        now = time.time()
        changed: int = await self._batched(self._write, _EXTEND, (now + lease, key, token, now))
        return changed == 1

    async def done(self, key: str, token: str) -> None:
        await self._batched(self._write, _DONE, (key, token, time.time() + self.retention))

    async def release(self, key: str, token: str) -> None:
        await self._batched(self._write, _RELEASE, (key, token))

    async def record_outcome(self, key: str, settled: int) -> None:
        expires = time.time() + self.retention
        await self._batched(self._write, _RECORD, (key + OUTCOME_SUFFIX, str(settled), expires))

    async def recorded_outcome(self, key: str) -> int | None:
        row = await self._batched(self._read, _RECORDED, (key + OUTCOME_SUFFIX, time.time()))
        return int(row[0]) if row is not None else None

    async def purge(self) -> int:
        purged: int = await self._batched(self._write, _PURGE, (time.time(),))
        return purged

    async def _batched(self, op: Callable[..., object], *args: object) -> Any:
        """Queue ``op`` for the next group commit and wait for its committed result."""
        if self._executor is None:
            raise RuntimeError("SQLiteStore is not open: await store.open() first")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._pending.append((op, args, future, loop))
            start = not self._draining
            self._draining = True
        if start:
            self._executor.submit(self._drain)
        return await future

    def _drain(self) -> None:
        """On the store's thread: run everything pending, one transaction per round."""
        assert self._conn is not None
        conn = self._conn
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._draining = False
                    return
            results: list[tuple[object, BaseException | None]] = []
            try:
                conn.execute("BEGIN IMMEDIATE")
                for op, args, _, _ in batch:
                    try:
                        results.append((op(*args), None))
                    except sqlite3.Error as exc:
                        results.append((None, exc))
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                results = [(None, exc)] * len(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
            for (_, _, future, loop), (value, error) in zip(batch, results, strict=True):
                by_loop.setdefault(loop, []).append((future, value, error))
            for loop, answers in by_loop.items():  # one wake-up per loop, not per caller
                loop.call_soon_threadsafe(_resolve_all, answers)

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        if self._executor is None:
            raise RuntimeError("SQLiteStore is not open: await store.open() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            for statement in _SCHEMA:
                conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _claim(self, key: str, lease: float) -> Claim:
        assert self._conn is not None
        token = new_token()
        while True:
            now = time.time()
            if self._conn.execute(_CLAIM, (key, token, now + lease, now)).fetchall():
                return Claim(ClaimState.CLAIMED, token)
            row = self._conn.execute(_LOOKUP, (key,)).fetchone()
            if row is None:
                continue
            if row[0] == ClaimState.DONE.value:
                return Claim(ClaimState.DONE)
            return Claim(ClaimState.IN_PROGRESS, retry_after=max(row[1] - now, 0.0), holder=row[2])

    def _read(self, sql: str, params: tuple[object, ...]) -> Any:
        assert self._conn is not None
        return self._conn.execute(sql, params).fetchone()

    def _write(self, sql: str, params: tuple[object, ...]) -> int:
        assert self._conn is not None
        return self._conn.execute(sql, params).rowcount


_Request = tuple[
    Callable[..., object], tuple[object, ...], "asyncio.Future[Any]", asyncio.AbstractEventLoop
]


_Answer = tuple["asyncio.Future[Any]", object, BaseException | None]


def _resolve_all(answers: list[_Answer]) -> None:
    for future, value, error in answers:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL, waiting while another process opening it does the same.

    SQLite does not call the busy handler for this switch, so without the
    retry a second listener starting at the same moment fails at once.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
