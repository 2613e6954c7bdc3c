"""The relay: publishes committed outbox rows with confirms, in key order, exactly-once-ish.

One loop: claim a batch, publish it through the app's confirmed publisher,
mark it published (or delete it), repeat; when the table is empty, sleep
until woken. Guarantees and how each is kept:

- **Only after the confirm.** A row is marked only after the broker confirmed
  its message; a relay killed in between leaves the row unmarked, and another
  relay (or the restarted one) publishes it again with the same message id,
  which every listener's idempotency or inbox drops.
- **Several relays.** PostgreSQL: a batch's rows are locked ``FOR UPDATE SKIP
  LOCKED`` in a transaction that stays open through the publish and commits
  the mark; other relays skip them, and a relay that dies (its connection
  closes) gives them back at once. SQLite cannot keep a write lock that long:
  a claim there is one short transaction that writes this relay's name and a
  lease (``claimed_until``), and others skip the rows until the lease ends.
- **Per-key order.** A relay keeps a row only if every earlier pending row of
  the same key is in its own batch; a key whose head is held elsewhere waits.
- **No busy polling.** PostgreSQL relays ``LISTEN`` on the table's channel
  (dispatching processes send a ``NOTIFY``, at most one per 50 ms); the poll
  is only a fallback. Relays in the dispatching process are woken after the
  commit, and that process sends no ``NOTIFY``.
- **Broker outage.** A batch the broker did not confirm is released and the
  relay backs off exponentially (up to ``max_backoff``) before the next try;
  the rows it did confirm are marked all the same.
- **A row no publish can carry** (it cannot be encoded, or read) is set aside
  with its ``error`` and logged once; its key's later rows wait behind it (the
  order is kept) and every other key goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge
from sqlalchemy import (
    ColumnElement,
    Executable,
    Row,
    Select,
    delete,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from pigeon.amqp import check_encodable
from pigeon.core.messages import Outgoing
from pigeon.errors import ConfigurationError, DispatchError, DispatchManyError
from pigeon.logs import get_logger
from pigeon.metrics import DISPATCHED
from pigeon.outbox.box import Outbox
from pigeon.outbox.tables import ERROR_COLUMN, listen_dsn, load_headers

if TYPE_CHECKING:
    from pigeon.app import Pigeon
    from pigeon.core.listener import TransactionalOutbox

log = get_logger("pigeon")

PENDING = Gauge("pigeon_outbox_pending", "Outbox rows not yet published.", ["table"])
LAG = Gauge(
    "pigeon_outbox_lag_seconds", "Age of the oldest outbox row not yet published.", ["table"]
)
FAILED = Gauge(
    "pigeon_outbox_failed", "Outbox rows set aside: no publish can carry them.", ["table"]
)

MAINTENANCE_INTERVAL = 60.0
METRICS_INTERVAL = 5.0
LINGER = 1.0
"""Seconds a relay that just found rows keeps looking every ``FAST_POLL``: producers
NOTIFY at most every 50 ms, so the transactions in between are found this way."""
FAST_POLL = 0.025
CONTENDED_WAIT = 0.05
"""Seconds to wait after a claim left rows to another relay: they free up without a NOTIFY."""


@dataclass
class _Outcome:
    """What became of a batch's rows: confirmed, set aside (row id → why), or to try again."""

    done: list[int] = field(default_factory=list)
    aside: dict[int, str] = field(default_factory=dict)
    again: list[int] = field(default_factory=list)
    error: DispatchManyError | None = None


@dataclass(eq=False)
class _Batch:
    """Rows claimed for one publish; on PostgreSQL, with the transaction that locks them."""

    rows: list[Row[Any]]
    conn: AsyncConnection | None = None

    async def end(self, *, commit: bool) -> None:
        """Commit (the rows are marked) or roll back (they are free again); then let go."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            if commit:
                await conn.commit()
            else:
                await conn.rollback()
        finally:
            await conn.close()


class Relay:
    """Publishes the committed rows of one outbox until stopped.

    ``await relay.run()`` returns 0 after :meth:`stop` (it finishes the batch
    in hand first). ``poll_interval`` is the fallback poll (default 10 s on
    PostgreSQL, which is woken by NOTIFY, and 1 s on SQLite); ``lease`` (default:
    the outbox's) is how long a claim protects its rows on SQLite, and twice
    the time a batch's publish may take before its rows are given back.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        app: Pigeon | None = None,
        batch_size: int = 500,
        lease: float | None = None,
        poll_interval: float | None = None,
        max_backoff: float = 30.0,
        listen: bool = True,
        shutdown_timeout: float = 20.0,
    ) -> None:
        self.outbox = outbox
        self.app = app
        self.batch_size = batch_size
        self.lease = outbox.lease if lease is None else lease
        postgres = outbox.dialect == "postgresql"
        self.poll_interval = poll_interval or (10.0 if postgres else 1.0)
        self.max_backoff = max_backoff
        self.shutdown_timeout = shutdown_timeout
        self._batch: asyncio.Future[int] | None = None
        self.listen = listen and postgres
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.published = 0
        self.ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Any = None
        self._failures = 0
        self._contended = False
        self._linger_until = 0.0
        self._maintained = 0.0
        self._measured = 0.0
        self._error_column = False
        self._aside: dict[int, str] = {}  # row id → key: set aside where no error column keeps it
        table = outbox.table
        self._columns = [
            table.c[name]
            for name in (
                "id", "message_id", "key", "exchange", "routing_key", "event_name", "body",
                "headers", "correlation_id", "app_id", "content_type", "content_encoding",
                "created_at",
            )
        ]  # fmt: skip

    # -- lifecycle -------------------------------------------------------------------

    def stop(self, reason: str = "requested") -> None:
        """Finish the batch in hand, then return from :meth:`run`; safe to call twice."""
        if not self._stopping.is_set():
            log.info("outbox.relay_stopping", table=self.outbox.table.name, reason=reason)
            self._stopping.set()
            self._wake.set()
            if self._loop is not None:
                self._loop.call_later(self.shutdown_timeout, self._abandon_batch)

    def _abandon_batch(self) -> None:
        """Past the shutdown timeout (a broker outage): give the batch's rows back."""
        if self._batch is not None and not self._batch.done():
            log.warning("outbox.relay_abandoned_batch", table=self.outbox.table.name)
            self._batch.cancel()

    def wake(self) -> None:
        """Look for rows now instead of at the next poll (thread-safe)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> int:
        """Relay until stopped; returns the exit code (0)."""
        self._loop = asyncio.get_running_loop()
        self.outbox.add_waker(self.wake)
        log.info("outbox.relay_started", table=self.outbox.table.name, relay=self.name)
        try:
            while not self._stopping.is_set():
                await self._ensure_listening()
                self._wake.clear()
                batch = self._batch = asyncio.ensure_future(self._pump())
                try:
                    count = await batch
                    await self._maintain()
                except asyncio.CancelledError:
                    if not self._stopping.is_set() or not batch.done():
                        batch.cancel()  # run() itself was cancelled: no orphan batch
                        raise
                    break
                except Exception as exc:
                    await self._back_off(exc)
                    continue
                self._failures = 0
                self.ready.set()
                if count:
                    self._linger_until = time.monotonic() + LINGER
                await self._idle(self._next_look())
        finally:
            self.outbox.remove_waker(self.wake)
            await self._stop_listening()
        log.info("outbox.relay_stopped", table=self.outbox.table.name, published=self.published)
        return 0

    def _next_look(self) -> float:
        """Seconds until the next claim when nothing wakes the relay."""
        if self._contended:
            return CONTENDED_WAIT
        if time.monotonic() < self._linger_until:
            return FAST_POLL
        return self.poll_interval

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _back_off(self, exc: BaseException) -> None:
        """Wait 0.5 s, 1 s, 2 s ... up to ``max_backoff`` (with jitter) after a failure."""
        self._failures += 1
        self.ready.clear()  # /healthz answers 503 until a round succeeds again
        delay = min(0.5 * 2 ** (self._failures - 1), self.max_backoff)
        delay *= random.uniform(0.8, 1.2)
        log.warning(
            "outbox.relay_failed",
            table=self.outbox.table.name,
            error=repr(exc),
            attempt=self._failures,
            retry_in=round(delay, 2),
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    # -- one batch -------------------------------------------------------------------

    async def relay_once(self) -> int:
        """Claim, publish and mark one batch; returns how many rows were published.

        A batch the broker did not confirm is released (for this relay or
        another to retry) and the error is raised.
        """
        return await self._send(await self._claim())

    async def _pump(self) -> int:
        """Relay batches until a claim comes back short; returns the rows published.

        The next batch is claimed while the last one waits for its confirms, so
        the database and the broker work at the same time. Per-key order holds:
        a claim skips every key whose earlier row is still in flight here.
        """
        total = 0
        in_flight: tuple[_Batch, asyncio.Future[int]] | None = None
        try:
            while not self._stopping.is_set():
                batch = await self._claim()
                if not batch.rows and self._contended and in_flight is not None:
                    total += await in_flight[1]  # its keys block the rest: let it land first
                    in_flight = None
                    continue
                sending = (batch, asyncio.ensure_future(self._send(batch))) if batch.rows else None
                if in_flight is not None:
                    total += await in_flight[1]
                in_flight = sending
                if len(batch.rows) < self.batch_size:
                    break
            if in_flight is not None:
                total += await in_flight[1]
                in_flight = None
        finally:
            if in_flight is not None:  # an error or a cancel: the other batch gives back its rows
                in_flight[1].cancel()
                await asyncio.gather(in_flight[1], return_exceptions=True)
                with contextlib.suppress(Exception):  # a batch whose task never started
                    await asyncio.shield(in_flight[0].end(commit=False))
        return total

    async def _send(self, batch: _Batch) -> int:
        """Publish the batch, then in one transaction mark the rows the broker confirmed and
        set aside those no publish can carry; raise if some are to be tried again."""
        rows = batch.rows
        if not rows:
            return 0
        outcome = _Outcome()
        messages = self._messages(rows, outcome)
        try:
            # an outage must not outlive the lease: past half of it, the rows go back
            async with asyncio.timeout(self.lease / 2):
                if messages:
                    await self._publish([out for _, out in messages])
            outcome.done = [row_id for row_id, _ in messages]
        except DispatchManyError as exc:
            _sort(outcome, messages, exc)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._give_back(batch, [row.id for row in rows]))
            raise
        await self._settle(batch, outcome)
        self._report(rows, outcome.aside)
        self.published += len(outcome.done)
        if outcome.error is not None:
            raise outcome.error
        return len(outcome.done)

    def _messages(self, rows: list[Row[Any]], outcome: _Outcome) -> list[tuple[int, Outgoing]]:
        """The batch's messages; a row that cannot be read or encoded is set aside, and the
        rows of its key after it stay out of this publish (they wait behind it)."""
        messages: list[tuple[int, Outgoing]] = []
        held: set[str] = set()
        for row in rows:
            if row.key in held:
                outcome.again.append(row.id)
                continue
            try:
                out = self._outgoing(row)
                check_encodable(out)
            except Exception as exc:  # written by hand, by an older Pigeon, or edited
                outcome.aside[row.id] = f"cannot be published: {type(exc).__name__}: {exc}"
                held.add(row.key)
                continue
            messages.append((row.id, out))
        return messages

    def _report(self, rows: list[Row[Any]], aside: dict[int, str]) -> None:
        """Log each row just set aside, once."""
        for row in rows:
            if row.id in aside:
                log.error(
                    "outbox.row_set_aside",
                    table=self.outbox.table.name,
                    id=row.id,
                    message_id=row.message_id,
                    key=row.key,
                    error=aside[row.id],
                )

    async def _publish(self, batch: list[Outgoing]) -> None:
        from pigeon import app as app_module

        app = self.app or self.outbox.app or app_module.default_app()
        sink = app_module.sink()
        if sink is not None:  # pigeon.testing.fake(): captured like any dispatch
            for out in batch:
                await sink(out)
            return
        await app.runtime().publisher.publish_many(batch)
        for out in batch:
            DISPATCHED.labels(out.event_name).inc()

    async def _claim(self) -> _Batch:
        """The next rows this relay may publish without breaking any key's order."""
        if self.outbox.dialect == "postgresql":
            return await self._claim_locked()
        return _Batch(await self._claim_leased())

    async def _claimable(self, now: float) -> list[ColumnElement[bool]]:
        """Rows to publish: pending, not claimed by another relay, not set aside, and
        not behind a row of their key that was set aside (that key waits for it)."""
        table = self.outbox.table
        where = [
            table.c.published_at.is_(None),
            or_(table.c.claimed_until.is_(None), table.c.claimed_until < now),
        ]
        self._error_column = await has_error_column(self.outbox)
        if self._error_column:
            failed = table.c.published_at.is_(None) & table.c.error.is_not(None)
            where.append(table.c.error.is_(None))
            where.append(table.c.key.not_in(select(table.c.key).where(failed)))
        if self._aside:
            where.append(table.c.id.not_in(list(self._aside)))
            where.append(table.c.key.not_in(set(self._aside.values())))
        return where

    def _candidates(self, where: list[ColumnElement[bool]]) -> Select[Any]:
        return (
            select(*self._columns)
            .where(*where)
            .order_by(self.outbox.table.c.id)
            .limit(self.batch_size)
        )

    async def _claim_locked(self) -> _Batch:
        """PostgreSQL: lock the rows ``FOR UPDATE SKIP LOCKED`` in a transaction that stays
        open until they are marked. Its rollback (or the death of its connection, when the
        relay is killed) gives them back at once; no lease is written."""
        where = await self._claimable(time.time())  # before the connection: a pool of one
        batch = _Batch([], await self.outbox.relay_engine().connect())
        try:
            assert batch.conn is not None
            await batch.conn.begin()
            query = self._candidates(where).with_for_update(skip_locked=True)
            rows = list((await batch.conn.execute(query)).all())
            batch.rows = await self._in_key_order(batch.conn, rows) if rows else []
            self._contended = len(batch.rows) < len(rows)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(batch.end(commit=False))
            raise
        if not batch.rows:
            await batch.end(commit=False)
        return batch

    async def _claim_leased(self) -> list[Row[Any]]:
        """SQLite: lease the rows (``claimed_until``) in one short write transaction."""
        table = self.outbox.table
        now = time.time()
        where = await self._claimable(now)
        if not await self._any_pending(where):
            return []
        async with self.outbox.relay_engine().begin() as conn:
            # take the write lock first: claims queue up
            await conn.execute(
                update(table).where(table.c.id == -1).values(claimed_by=table.c.claimed_by)
            )
            rows = list((await conn.execute(self._candidates(where))).all())
            self._contended = False
            if not rows:
                return []
            selected = len(rows)
            rows = await self._in_key_order(conn, rows)
            self._contended = len(rows) < selected
            if rows:
                await conn.execute(
                    update(table)
                    .where(table.c.id.in_([row.id for row in rows]))
                    .values(claimed_by=self.name, claimed_until=now + self.lease)
                )
            return rows

    async def _any_pending(self, where: list[ColumnElement[bool]]) -> bool:
        """SQLite: a read-only look first, so an idle relay never takes the write lock."""
        table = self.outbox.table
        async with self.outbox.relay_engine().connect() as conn:
            found = await conn.execute(select(table.c.id).where(*where).limit(1))
            return found.first() is not None

    async def _in_key_order(self, conn: AsyncConnection, rows: list[Row[Any]]) -> list[Row[Any]]:
        """Of ``rows``, those whose every earlier pending row of the same key is in ``rows``."""
        table = self.outbox.table
        mine = {row.id for row in rows}
        keys = {row.key for row in rows}
        earlier = await conn.execute(
            select(table.c.id, table.c.key)
            .where(
                table.c.published_at.is_(None),
                table.c.key.in_(keys),
                table.c.id <= max(mine),
            )
            .order_by(table.c.id)
        )
        blocked: set[str] = set()
        keep: set[int] = set()
        for row_id, key in earlier:
            if key in blocked:
                continue
            if row_id in mine:
                keep.add(row_id)
            else:
                blocked.add(key)
        return [row for row in rows if row.id in keep]

    def _outgoing(self, row: Row[Any]) -> Outgoing:
        return Outgoing(
            exchange=row.exchange,
            routing_key=row.routing_key,
            body=bytes(row.body),
            message_id=row.message_id,
            event_name=row.event_name,
            headers=load_headers(row.headers),
            correlation_id=row.correlation_id,
            app_id=row.app_id,
            content_type=row.content_type,
            content_encoding=row.content_encoding,
            timestamp=datetime.fromtimestamp(row.created_at, UTC),
        )

    def _done(self, ids: Sequence[int]) -> Executable:
        """The statement that marks confirmed rows (deletes them when ``retention`` is 0)."""
        table = self.outbox.table
        if self.outbox.retention <= 0:
            return delete(table).where(table.c.id.in_(ids))
        return (
            update(table)
            .where(table.c.id.in_(ids))
            .values(published_at=time.time(), claimed_by=None, claimed_until=None)
        )

    async def _set_aside(self, aside: dict[int, str], keys: dict[int, str]) -> list[Executable]:
        """The statements that set these rows aside with their error (where the table has
        no error column, this relay remembers them instead, until it stops)."""
        if not aside:
            return []
        if not self._error_column:  # known since the claim (no connection here: see _claim_locked)
            self._aside.update({row_id: keys[row_id] for row_id in aside})
            return []
        table = self.outbox.table
        return [
            update(table)
            .where(table.c.id == row_id)
            .values(error=error[:2000], claimed_by=None, claimed_until=None)
            for row_id, error in aside.items()
        ]

    def _release(self, ids: Sequence[int]) -> Executable:
        """SQLite: the statement that ends this relay's lease on ``ids``."""
        table = self.outbox.table
        return (
            update(table)
            .where(table.c.id.in_(ids), table.c.claimed_by == self.name)
            .values(claimed_by=None, claimed_until=None)
        )

    async def _settle(self, batch: _Batch, outcome: _Outcome) -> None:
        """After the publish, in one transaction (the claim's on PostgreSQL): mark the
        confirmed rows, set aside the ones no publish can carry, give back the rest."""
        statements: list[Executable] = [self._done(outcome.done)] if outcome.done else []
        keys = {row.id: row.key for row in batch.rows}
        statements += await self._set_aside(outcome.aside, keys)
        if batch.conn is None:
            if outcome.again:
                statements.append(self._release(outcome.again))
            if statements:
                async with self.outbox.relay_engine().begin() as conn:
                    for statement in statements:
                        await conn.execute(statement)
            return
        try:  # the rows to try again are unlocked by the commit, unchanged
            for statement in statements:
                await batch.conn.execute(statement)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(batch.end(commit=False))
            raise
        await batch.end(commit=True)

    async def _give_back(self, batch: _Batch, ids: Sequence[int]) -> None:
        if batch.conn is not None:
            await batch.end(commit=False)
            return
        async with self.outbox.relay_engine().begin() as conn:
            await conn.execute(self._release(ids))

    # -- housekeeping ----------------------------------------------------------------

    async def _maintain(self) -> None:
        """Now and then: refresh the metrics, purge old published rows and inbox entries."""
        now = time.monotonic()
        try:
            if now - self._measured >= METRICS_INTERVAL:
                self._measured = now
                await self.measure()
            if now - self._maintained >= MAINTENANCE_INTERVAL:
                self._maintained = now
                await purge(self.outbox, self.app)
        except Exception as exc:  # housekeeping never holds up relaying
            log.warning("outbox.maintenance_failed", table=self.outbox.table.name, error=repr(exc))

    async def measure(self) -> tuple[int, float | None]:
        """Pending rows and the oldest one's age in seconds; also sets the metrics."""
        pending, age = await status(self.outbox)
        PENDING.labels(self.outbox.table.name).set(pending)
        LAG.labels(self.outbox.table.name).set(age or 0.0)
        FAILED.labels(self.outbox.table.name).set(await failed(self.outbox) or len(self._aside))
        return pending, age

    # -- LISTEN/NOTIFY ---------------------------------------------------------------

    async def _ensure_listening(self) -> None:
        """PostgreSQL: a dedicated asyncpg connection LISTENs on the table's channel.

        If it cannot be opened the relay still works, on its poll; it tries again
        on the next round.
        """
        if not self.listen or (self._listener is not None and not self._listener.is_closed()):
            return
        try:
            import asyncpg

            dsn = listen_dsn(self.outbox.relay_engine().url)
            conn = await asyncpg.connect(dsn, timeout=10)
            await conn.add_listener(self.outbox.channel, self._notified)
        except Exception as exc:
            log.warning("outbox.listen_failed", table=self.outbox.table.name, error=repr(exc))
            self._listener = None
            return
        self._listener = conn
        self._wake.set()  # rows committed while nobody listened

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def _stop_listening(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)


def _sort(outcome: _Outcome, messages: list[tuple[int, Outgoing]], exc: DispatchManyError) -> None:
    """Sort a batch the broker took only in part: its confirmed rows are done; a row whose
    message could not even be sent (it cannot be encoded) is set aside; the rest wait."""
    row_ids = {out.message_id: row_id for row_id, out in messages}
    outcome.done = [row_ids[message_id] for message_id in exc.confirmed]
    for message_id in exc.unconfirmed:
        error = exc.errors.get(message_id)
        if error is None or isinstance(error, DispatchError):  # an outage, a nack: later
            outcome.again.append(row_ids[message_id])
            outcome.error = exc
        else:
            reason = f"cannot be published: {type(error).__name__}: {error}"
            outcome.aside[row_ids[message_id]] = reason


_ERROR_COLUMNS: weakref.WeakKeyDictionary[Outbox, bool] = weakref.WeakKeyDictionary()


async def has_error_column(outbox: Outbox) -> bool:
    """Whether the outbox table has the ``error`` column (tables made before it was added
    do not: one error says how to add it, and they work without it)."""
    known = _ERROR_COLUMNS.get(outbox)
    if known is not None:
        return known
    name = outbox.table.name

    def columns(sync: Any) -> set[str] | None:
        inspector = inspect(sync)
        if not inspector.has_table(name):
            return None
        return {column["name"] for column in inspector.get_columns(name)}

    async with outbox.relay_engine().connect() as conn:
        found = await conn.run_sync(columns)
    if found is None:  # no table (yet): the queries say so
        return False
    known = _ERROR_COLUMNS[outbox] = ERROR_COLUMN in found
    if not known:
        log.error(
            "outbox.table_outdated",
            table=name,
            error=f"table {name} has no column {ERROR_COLUMN}: a row no publish can carry is "
            f"set aside only until the relay restarts; add it and its index (ALTER TABLE {name} "
            f"ADD COLUMN {ERROR_COLUMN} TEXT, or Alembic autogenerate; docs/outbox.md, "
            "Upgrading)",
        )
    return known


async def status(outbox: Outbox) -> tuple[int, float | None]:
    """``(pending rows, age in seconds of the oldest pending row or None)``; rows set
    aside are not pending (:func:`failed` counts them)."""
    table = outbox.table
    where = [table.c.published_at.is_(None)]
    if await has_error_column(outbox):
        where.append(table.c.error.is_(None))
    async with outbox.relay_engine().connect() as conn:
        row = (
            await conn.execute(select(func.count(), func.min(table.c.created_at)).where(*where))
        ).one()
    pending, oldest = int(row[0]), row[1]
    return pending, (max(time.time() - float(oldest), 0.0) if oldest is not None else None)


async def failed(outbox: Outbox) -> int | None:
    """Rows the relay set aside (no publish can carry them); None if the table has no
    ``error`` column to keep them in."""
    table = outbox.table
    if not await has_error_column(outbox):
        return None
    async with outbox.relay_engine().connect() as conn:
        found = await conn.execute(
            select(func.count()).where(table.c.published_at.is_(None), table.c.error.is_not(None))
        )
    return int(found.scalar_one())


async def purge(outbox: Outbox, app: Pigeon | None = None) -> tuple[int, int]:
    """Delete published rows older than the retention and inbox entries older than theirs."""
    owner = app or outbox.app
    inbox_retention = outbox.inbox_retention
    if inbox_retention is None:
        inbox_retention = owner.settings.idempotency_retention if owner else 7 * 24 * 3600.0
    now = time.time()
    async with outbox.relay_engine().begin() as conn:
        published = await conn.execute(
            delete(outbox.table).where(outbox.table.c.published_at < now - outbox.retention)
        )
        handled = await conn.execute(
            delete(outbox.inbox).where(outbox.inbox.c.created_at < now - inbox_retention)
        )
    counts = (int(getattr(published, "rowcount", 0)), int(getattr(handled, "rowcount", 0)))
    if any(counts):
        log.info("outbox.purged", table=outbox.table.name, published=counts[0], inbox=counts[1])
    return counts


class RelayGroup:
    """The relays a ``pigeon listen`` runs beside its listeners, one per distinct outbox."""

    def __init__(self, relays: list[Relay]) -> None:
        self.relays = relays
        self.tasks = [asyncio.ensure_future(relay.run()) for relay in relays]

    @classmethod
    def start(cls, app: Pigeon, outboxes: Sequence[TransactionalOutbox]) -> RelayGroup:
        """Relays for the distinct ``outboxes``; each must be a :class:`Outbox`."""
        unique: dict[int, Outbox] = {}
        for box in outboxes:
            if not isinstance(box, Outbox):
                raise ConfigurationError(
                    f"pigeon listen can relay only a pigeon.outbox.Outbox, not {box!r}: "
                    "pass outbox=Outbox(engine) to the listener"
                )
            unique[id(box)] = box
        return cls([Relay(box, app=app) for box in unique.values()])

    async def stop(self) -> None:
        """Let each relay finish its batch in hand, then wait for it."""
        for relay in self.relays:
            relay.stop("worker stopping")
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for relay in self.relays:
            await relay.outbox.close()
