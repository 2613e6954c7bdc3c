"""The outbox: events stored in the caller's own database transaction.

``outbox.dispatch(session, event)`` writes the complete wire message (the one
:func:`pigeon.dispatch` would publish, built by the same code) into
``pigeon_outbox`` in the transaction ``session`` is in. The event exists if and
only if that transaction commits; a relay (``pigeon outbox relay`` or the
``pigeon listen`` of a listener using this outbox) publishes it afterwards with
publisher confirms. Its message id is fixed when the row is written, so a
publish repeated after a crash is the same message to every listener.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Unpack, cast

from sqlalchemy import Engine, event, insert, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from pigeon.core import pipeline
from pigeon.core.messages import DispatchOptions, OutboxOptions, Outgoing, build_outgoing
from pigeon.errors import ConfigurationError, PigeonError
from pigeon.events import Event
from pigeon.outbox.tables import (
    INBOX_TABLE,
    OUTBOX_TABLE,
    async_url,
    connect_args,
    dump_headers,
    make_tables,
)
from pigeon.outbox.writelock import write_turn, write_turn_async
from pigeon.tables import short_string

if TYPE_CHECKING:
    from pigeon.app import Pigeon
    from pigeon.core.listener import Context, Handler, ListenerApp

_TX_INFO = "pigeon_outbox_tx"
_WAKE_INFO = "pigeon_outbox_wake"
_NOTIFY = text("SELECT pg_notify(:channel, '')")

DEFAULT_RETENTION = 3600.0
"""Seconds a published row is kept (for ``pigeon outbox status`` and forensics)."""
NOTIFY_EVERY = 0.05
"""Seconds between two NOTIFYs of one process: NOTIFY serializes the commits of the
transactions that send it (PostgreSQL takes a database-wide lock until the commit is
flushed), so a busy producer sends one per 50 ms and the relay, woken by it, keeps
looking for a moment (``LINGER``) to pick up the transactions that did not notify.
A process that runs a relay of this outbox itself sends none: its commits wake that
relay directly."""
DEFAULT_LEASE = 60.0
"""Seconds a relay's claim protects its rows from other relays."""


class Outbox:
    """The outbox and inbox tables of one database, reached through ``engine``.

    ``engine`` is a SQLAlchemy ``Engine`` (sync code, sync handlers), an
    ``AsyncEngine`` (asyncio code, async handlers) or a URL string (the relay
    and ``pigeon outbox status`` need nothing else). ``app`` stamps the
    messages (exchange, ``app_id``); by default the app of the listener that
    dispatches, else :func:`pigeon.default_app`. ``retention`` is how long
    published rows stay (0: deleted once confirmed); ``inbox_retention`` how
    long handled message ids are remembered (default ``PIGEON_IDEMPOTENCY_RETENTION``);
    ``lease`` how long a relay's claim on rows lasts on SQLite (rows of a relay
    that died are published by another after it; on PostgreSQL they are free
    at once), and twice the time a batch's publish may take before its rows are
    given back (keep it above ``PIGEON_DISPATCH_TIMEOUT``).
    """

    def __init__(
        self,
        engine: Engine | AsyncEngine | str,
        *,
        app: Pigeon | None = None,
        table: str = OUTBOX_TABLE,
        inbox_table: str = INBOX_TABLE,
        retention: float = DEFAULT_RETENTION,
        inbox_retention: float | None = None,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        if isinstance(engine, str):
            engine = create_async_engine(async_url(engine), connect_args=connect_args(engine))
        self.engine = engine
        self.app = app
        self.metadata, self.table, self.inbox = make_tables(table, inbox_table)
        self._insert = insert(self.table)
        self.retention = retention
        self.lease = lease
        self.inbox_retention = inbox_retention
        self.dialect = engine.dialect.name
        if self.dialect not in ("postgresql", "sqlite"):
            raise ConfigurationError(
                f"the outbox supports PostgreSQL and SQLite, not {self.dialect}"
            )
        if self.dialect == "sqlite" and engine.url.database in (None, "", ":memory:"):
            raise ConfigurationError("the relay cannot see an in-memory SQLite: use sqlite:///path")
        self._relay_engine: AsyncEngine | None = engine if isinstance(engine, AsyncEngine) else None
        self._wakers: list[Callable[[], None]] = []
        self._notified_at = -NOTIFY_EVERY
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Outbox {self.table.name} on {self.engine.url!r}>"

    @property
    def is_async(self) -> bool:
        return isinstance(self.engine, AsyncEngine)

    @property
    def channel(self) -> str:
        """The PostgreSQL ``NOTIFY`` channel relays of this table listen on."""
        return self.table.name

    def relay_engine(self) -> AsyncEngine:
        """The async engine relays use (the outbox's own, or one made from its URL)."""
        with self._lock:
            if self._relay_engine is None:
                url = async_url(self.engine.url)
                self._relay_engine = create_async_engine(url, connect_args=connect_args(url))
            return self._relay_engine

    def check_handler(self, listener: str, *, is_async: bool) -> None:
        """Raise :class:`ConfigurationError` unless the handler's kind matches the engine's."""
        if is_async and not self.is_async:
            raise ConfigurationError(
                f"listener {listener} is async but its outbox has a sync Engine: "
                "pass an AsyncEngine (create_async_engine) or make the handler a plain def"
            )
        if not is_async and self.is_async:
            raise ConfigurationError(
                f"listener {listener} is a sync handler but its outbox has an AsyncEngine: "
                "pass a sync Engine (create_engine) or make the handler async def"
            )

    # -- schema ----------------------------------------------------------------------

    def create_tables(self) -> None:
        """Create ``pigeon_outbox`` and ``pigeon_inbox`` if missing (sync engines)."""
        if isinstance(self.engine, AsyncEngine):
            raise ConfigurationError("this Outbox has an AsyncEngine: await create_tables_async()")
        with self.engine.begin() as conn:
            self.metadata.create_all(conn)
        self._wal_mode()

    async def create_tables_async(self) -> None:
        """Create ``pigeon_outbox`` and ``pigeon_inbox`` if missing (any engine)."""
        engine = self.relay_engine()
        async with engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)
        if self.dialect == "sqlite":
            async with engine.connect() as conn:
                await conn.exec_driver_sql("PRAGMA journal_mode=WAL")

    def _wal_mode(self) -> None:
        """SQLite: WAL, so readers (the relay's scans) never block the writers."""
        if self.dialect == "sqlite" and isinstance(self.engine, Engine):
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")

    # -- the inbox ---------------------------------------------------------------------

    # For a listener registered with ``outbox=``, the processor runs the handler
    # through run_sync (sync handler, sync Engine, in the handler's thread) or
    # run_async (async handler, AsyncEngine). Each opens a transaction, inserts
    # (queue, message_id) into pigeon_inbox and, unless that row already existed (a
    # duplicate: the handler does not run), runs the handler with ctx.session bound
    # to the transaction; ctx.dispatch stores into the outbox in it. The transaction
    # commits before the message is acked; an exception rolls back the effect, the
    # inbox row and the outgoing events alike, and the retry policy takes over.

    def run_sync(self, ctx: Context, handler: Handler, *args: Any) -> bool:
        """Run a sync handler in the inbox transaction; False if it was handled before."""
        with (
            write_turn(self.engine),
            InboxSession(self.engine, expire_on_commit=False) as session,  # type: ignore[arg-type]
            session.begin(),
        ):
            if not self.record(session, ctx.queue, ctx.message_id):
                return False
            ctx.bind_session(self, session)
            try:
                handler(*args)
            finally:
                ctx.bind_session(None, None)
        return True

    async def run_async(self, ctx: Context, handler: Handler, *args: Any) -> bool:
        """Run an async handler in the inbox transaction; False if it was handled before."""
        async with (
            write_turn_async(self.engine),
            _async_inbox_session(self.engine) as session,
            session.begin(),
        ):
            if not await self.record_async(session, ctx.queue, ctx.message_id):
                return False
            ctx.bind_session(self, session)
            try:
                await handler(*args)
            finally:
                ctx.bind_session(None, None)
        return True

    # -- dispatch --------------------------------------------------------------------

    def dispatch(
        self,
        session: Session,
        event: Event | str,
        payload: Mapping[str, Any] | None = None,
        *,
        app: ListenerApp | None = None,
        **options: Unpack[OutboxOptions],
    ) -> str:
        """Store ``event`` in ``session``'s transaction; returns its message id.

        Nothing is published now: the relay publishes it once the transaction
        committed, and never if it rolls back. Events with the same ``key``
        (default: those of one transaction) are published in the order they
        were written. Same keywords as :func:`pigeon.dispatch`, plus ``key``.

        The app's publish middleware runs here, around the insert, in the
        caller's context (a tracing span is the producer's, and its
        ``traceparent`` is stored with the row); the relay does not run it
        again. Here, with no event loop, it must await nothing but ``call_next``.
        """
        if isinstance(session, AsyncSession):
            raise TypeError("outbox.dispatch() takes a Session; await outbox.dispatch_async()")
        owner = self._owner(app)
        outgoing, key = self._build(owner, event, payload, options)

        async def store(out: Outgoing) -> str:
            row, notify = self._row(session, out, key)
            try:
                session.execute(self._insert, row)
            except IntegrityError as exc:
                self._refuse_duplicate(exc, out.message_id)
                raise
            if notify:
                session.execute(_NOTIFY, {"channel": self.channel})
            return out.message_id

        middleware = owner.publish_middleware
        if not middleware:
            return _run_now(store(outgoing))
        return _run_now(pipeline.chain(middleware, store)(outgoing))

    async def dispatch_async(
        self,
        session: AsyncSession,
        event: Event | str,
        payload: Mapping[str, Any] | None = None,
        *,
        app: ListenerApp | None = None,
        **options: Unpack[OutboxOptions],
    ) -> str:
        """The asyncio form of :meth:`dispatch`, for an ``AsyncSession``."""
        if not isinstance(session, AsyncSession):
            raise TypeError("outbox.dispatch_async() takes an AsyncSession; use outbox.dispatch()")
        owner = self._owner(app)
        outgoing, key = self._build(owner, event, payload, options)

        async def store(out: Outgoing) -> str:
            row, notify = self._row(session.sync_session, out, key)
            try:
                await session.execute(self._insert, row)
            except IntegrityError as exc:
                self._refuse_duplicate(exc, out.message_id)
                raise
            if notify:
                await session.execute(_NOTIFY, {"channel": self.channel})
            return out.message_id

        middleware = owner.publish_middleware
        if not middleware:
            return await store(outgoing)
        return await pipeline.chain(middleware, store)(outgoing)

    def _refuse_duplicate(self, exc: IntegrityError, message_id: str) -> None:
        """Raise ValueError if ``exc`` says the outbox holds ``message_id`` already."""
        if "message_id" in str(exc.orig):  # the table's one unique column besides its id
            raise ValueError(
                f"message id {message_id!r} is in outbox {self.table.name} already: ids are "
                "unique per outbox, give each event its own (the transaction must be rolled "
                "back)"
            ) from exc

    def _owner(self, app: ListenerApp | None) -> ListenerApp:
        """The app that stamps the message: the dispatching listener's, ours, or the default."""
        if app is not None:
            return app
        if self.app is not None:
            return self.app
        from pigeon.app import default_app

        return default_app()

    @staticmethod
    def _build(
        app: ListenerApp,
        event: Event | str,
        payload: Mapping[str, Any] | None,
        options: OutboxOptions,
    ) -> tuple[Outgoing, str | None]:
        """The wire message (built as :func:`pigeon.dispatch` builds it) and its key."""
        plain = cast(DispatchOptions, {k: v for k, v in options.items() if k != "key"})
        outgoing = build_outgoing(app.settings.exchange, app.service, event, payload, **plain)
        short_string(outgoing.message_id, "the message id")  # stored, it could never be published
        short_string(outgoing.correlation_id or "", "the correlation id")
        return outgoing, options.get("key")

    def _row(self, session: Session, out: Outgoing, key: str | None) -> tuple[dict[str, Any], bool]:
        """The row for ``out``, and whether this transaction still has to NOTIFY the relays."""
        if key is not None and len(key) > 255:
            raise ValueError(f"the key is {len(key)} characters long; the outbox keeps 255")
        tx = session.get_transaction() or session.begin()
        info = session.info.get(_TX_INFO)
        if info is None or info[0] is not tx:
            info = session.info[_TX_INFO] = (tx, uuid.uuid4().hex, [False])
        notify = False
        if self._wakers:  # a relay of this process is woken after the commit: no NOTIFY
            session.info[_WAKE_INFO] = self
        elif self.dialect == "postgresql" and not info[2][0]:
            info[2][0] = True
            now = time.monotonic()
            if now - self._notified_at >= NOTIFY_EVERY:
                self._notified_at, notify = now, True
        stamp = out.timestamp.timestamp() if out.timestamp is not None else time.time()
        return {
            "message_id": out.message_id,
            "key": key or info[1],
            "exchange": out.exchange,
            "routing_key": out.routing_key,
            "event_name": out.event_name,
            "body": out.body,
            "headers": dump_headers(out.headers),
            "correlation_id": out.correlation_id,
            "app_id": out.app_id,
            "content_type": out.content_type,
            "content_encoding": out.content_encoding,
            "created_at": stamp,
        }, notify

    # -- inbox -----------------------------------------------------------------------

    def _inbox_insert(self, queue: str, message_id: str) -> Any:
        if "\x00" in message_id and self.dialect == "postgresql":  # its text cannot hold NUL
            message_id = message_id.replace("\x00", "\\u0000")
        values = {"queue": queue, "message_id": message_id, "created_at": time.time()}
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        statement = dialect_insert(self.inbox).values(**values).on_conflict_do_nothing()
        return statement.returning(self.inbox.c.message_id)

    def record(self, session: Session, queue: str, message_id: str) -> bool:
        """Insert ``(queue, message_id)`` into the inbox; False when it was there (a duplicate)."""
        return session.execute(self._inbox_insert(queue, message_id)).first() is not None

    async def record_async(self, session: AsyncSession, queue: str, message_id: str) -> bool:
        """The asyncio form of :meth:`record`."""
        result = await session.execute(self._inbox_insert(queue, message_id))
        return result.first() is not None

    async def close(self) -> None:
        """Dispose of the relay engine this outbox made itself (not one it was given)."""
        made, self._relay_engine = self._relay_engine, None
        if made is not None and made is not self.engine:
            await made.dispose()
        elif made is not None:
            self._relay_engine = made

    # -- waking in-process relays ----------------------------------------------------

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (thread-safe) after a transaction that dispatched here commits."""
        _install_commit_hook()
        self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        if wake in self._wakers:
            self._wakers.remove(wake)

    def wake(self) -> None:
        for wake in list(self._wakers):
            wake()


class InboxSession(Session):
    """``ctx.session`` of a listener with ``outbox=`` (the sync session of an
    ``AsyncSession`` too): its transaction is Pigeon's, so :meth:`commit` is refused.

    A handler's own commit would take the message's done mark along: a failure
    after it was then acked as a duplicate on the retry and vanished. Savepoints
    (``begin_nested()``) work as usual.
    """

    def commit(self) -> None:
        raise PigeonError(
            "ctx.session is the inbox transaction: Pigeon commits it after the handler "
            "returns, with the message's done mark and outgoing events; do not commit it "
            "(session.flush() sends your changes and fills generated ids)"
        )


def _async_inbox_session(engine: Engine | AsyncEngine) -> AsyncSession:
    return AsyncSession(engine, sync_session_class=InboxSession, expire_on_commit=False)  # type: ignore[arg-type]


def _run_now(step: Awaitable[str]) -> str:
    """Run an awaitable that never suspends (the sync store and its publish middleware)."""
    steps = step.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        return cast(str, done.value)
    steps.close()
    raise RuntimeError(
        "a publish middleware awaited something other than call_next inside the sync "
        "outbox.dispatch(), which has no event loop: use await outbox.dispatch_async()"
    )


_hook_installed = False


def _install_commit_hook() -> None:
    """One process-wide ``after_commit`` hook: a commit that stored events wakes the relays
    of this process at once (other processes wake on NOTIFY, or on their poll)."""
    global _hook_installed
    if _hook_installed:
        return
    _hook_installed = True

    @event.listens_for(Session, "after_commit")
    def _after_commit(session: Session) -> None:
        box = session.info.pop(_WAKE_INFO, None)
        if isinstance(box, Outbox):
            box.wake()
