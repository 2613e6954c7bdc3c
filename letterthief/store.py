"""The letter store: SQLAlchemy 2 async over SQLite (default) or PostgreSQL.

Guarantees the collector relies on: :meth:`Store.ingest` writes a whole
batch in one transaction or nothing, so acking after it returns never loses
a letter; the same ``message_id`` in the same queue is one letter whose
occurrences grow (and which reopens); a redelivered copy of an occurrence
already stored (a crash between commit and ack) is not counted twice.
Migrations (``letterthief/migrations``) run in :meth:`Store.open`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Table, bindparam, delete, event, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from letterthief.models import Action, Letter, Occurrence, Status, utcnow
from letterthief.parse import Received
from letterthief.queries import Queries, valid_ids
from letterthief.settings import async_database_url
from pigeon.logs import get_logger
from pigeon.settings import mask_url

log = get_logger("letterthief")

MIGRATIONS = Path(__file__).parent / "migrations"
SEARCHED_BODY = 4096
_CHUNK = 400
CONFLICT_RETRIES = 3
"""Tries of a batch that raced another instance for the same new letter."""

letters = cast(Table, Letter.__table__)
occurrences = cast(Table, Occurrence.__table__)
actions = cast(Table, Action.__table__)


@dataclass(frozen=True, slots=True)
class Stored:
    """What the collector tells the alerter about one stored occurrence."""

    letter_id: int
    queue: str
    event: str
    service: str
    reason: str
    exception_type: str
    exception_message: str
    failed_at: datetime | None


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    """PostgreSQL text cannot hold NUL characters; message content sometimes does."""
    return {k: v.replace("\x00", "\ufffd") if isinstance(v, str) else v for k, v in values.items()}


def search_text(r: Received) -> str:
    body = r.body[:SEARCHED_BODY].decode("utf-8", "replace")
    return f"{r.message_id}\n{r.exception_message}\n{body}".lower()


def _message_values(r: Received) -> dict[str, Any]:
    """What a letter keeps from its first occurrence: the message itself (for the replay)."""
    return _clean(
        {
            "exchange": r.exchange,
            "routing_key": r.routing_key,
            "event": r.event,
            "service": r.service,
            "source": r.source,
            "correlation_id": r.correlation_id,
            "content_type": r.content_type,
            "body": r.body,
            "headers": r.headers,
            "properties": r.properties,
        }
    )


def _failure_values(r: Received, now: datetime) -> dict[str, Any]:
    """What each new occurrence updates: how it failed, and that the letter is open again."""
    return _clean(
        {
            "reason": r.reason,
            "exception_type": r.exception_type,
            "exception_message": r.exception_message,
            "traceback": r.traceback,
            "attempts": r.attempts,
            "search_text": search_text(r),
            "failed_at": r.failed_at,
            "last_seen_at": now,
            "status": Status.OPEN.value,
            "status_changed_at": now,
        }
    )


def _occurrence(r: Received, letter_id: int, now: datetime, first_body: bytes) -> dict[str, Any]:
    return _clean(
        {
            "letter_id": letter_id,
            "seen_at": now,
            "failed_at": r.failed_at,
            "reason": r.reason,
            "exception_type": r.exception_type,
            "exception_message": r.exception_message,
            "attempts": r.attempts,
            "replay_of": r.replay_of,
            "redelivered": r.redelivered,
            "fingerprint": r.fingerprint,
            "body": None if r.body == first_body else r.body,
        }
    )


def _new_letter(key: tuple[str, str], group: list[Received], now: datetime) -> dict[str, Any]:
    values = {**_failure_values(group[-1], now), **_message_values(group[0])}
    values.update(
        message_id=key[0],
        queue=key[1],
        occurrences=len(group),
        first_seen_at=now,
        last_retried_at=None,
        origin_problem=next((r.origin_problem for r in group if r.origin_problem), ""),
    )
    return values


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def make_engine(url: str) -> AsyncEngine:
    """An async engine for a documented URL; SQLite gets WAL and a busy timeout."""
    engine = create_async_engine(async_database_url(url), pool_pre_ping=True)
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            for pragma in (
                "journal_mode=WAL",
                "synchronous=NORMAL",
                "foreign_keys=ON",
                "busy_timeout=5000",
            ):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

    return engine


class StoreUnavailable(ValueError):
    """The database could not be opened; the message names it and the setting to fix."""


class Store(Queries):
    """Writes and reads letters; :class:`Queries` holds the read side."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.masked_url = mask_url(url)
        self.engine = make_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def open(self) -> None:
        """Apply the migrations up to head (idempotent).

        Raises :class:`StoreUnavailable` (a ``ValueError``) in one line naming the
        database when it cannot be reached or opened (missing, refused, no file).
        """
        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(_upgrade)
        except (DBAPIError, OSError) as exc:
            cause = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise StoreUnavailable(
                f"cannot open the database {self.masked_url}: {cause}. Create it, start it, "
                "or fix LETTERTHIEF_DATABASE_URL"
            ) from exc
        log.info("store.ready", url=self.masked_url)

    async def close(self) -> None:
        await self.engine.dispose()

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the collector's write path -------------------------------------------------

    async def ingest(self, batch: Sequence[Received]) -> list[Stored]:
        """Store ``batch`` in one transaction; returns the occurrences that were new.

                A letter keeps the message of its first occurrence (body, headers,
                properties: what a replay sends); later occurrences update how it
                failed and keep their own body when it differs.

        Several LetterThief instances may share one PostgreSQL database: two of
                them can read a letter as new and both insert it. The second insert
                fails on the unique (message_id, queue) and rolls its batch back; the
                batch is then stored again at once, now finding the letter and counting
                its occurrences onto it. Only a conflict that persists raises.
        """
        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                return await self._ingest(batch)
            except IntegrityError as exc:
                if attempt == CONFLICT_RETRIES:
                    raise
                log.info("store.concurrent_insert", letters=len(batch), error=str(exc.orig))
        raise AssertionError("unreachable")

    async def _ingest(self, batch: Sequence[Received]) -> list[Stored]:
        if not batch:
            return []
        now = utcnow()
        async with self.engine.begin() as conn:
            existing = await self._existing(conn, {(r.message_id, r.queue) for r in batch})
            seen = await self._seen_fingerprints(conn, batch, existing)
            kept = [
                r
                for r in batch
                if not (
                    r.redelivered
                    and r.fingerprint
                    and (existing.get((r.message_id, r.queue)), r.fingerprint) in seen
                )
            ]
            by_key: dict[tuple[str, str], list[Received]] = {}
            for r in kept:
                by_key.setdefault((r.message_id, r.queue), []).append(r)
            first_bodies = await self._bodies(conn, [existing[k] for k in by_key if k in existing])
            new_keys = [k for k in by_key if k not in existing]
            if new_keys:
                # no RETURNING: SQLite would run it row by row; read the new ids back instead
                await conn.execute(
                    insert(letters), [_new_letter(k, by_key[k], now) for k in new_keys]
                )
                existing.update(await self._existing(conn, set(new_keys)))
            for key in new_keys:
                first_bodies[existing[key]] = by_key[key][0].body
            await self._update_letters(conn, by_key, existing, set(new_keys), now)
            if kept:
                await conn.execute(
                    insert(occurrences),
                    [
                        _occurrence(
                            r, (i := existing[(r.message_id, r.queue)]), now, first_bodies[i]
                        )
                        for r in kept
                    ],
                )
        return [
            Stored(
                existing[(r.message_id, r.queue)],
                r.queue,
                r.event,
                r.service,
                r.reason,
                r.exception_type,
                r.exception_message,
                r.failed_at,
            )
            for r in kept
        ]

    async def _bodies(self, conn: Any, ids: list[int]) -> dict[int, bytes]:
        """The (first) bodies of existing letters, to tell which new occurrences differ."""
        bodies: dict[int, bytes] = {}
        for chunk in _chunks(sorted(set(ids))):
            rows = await conn.execute(
                select(letters.c.id, letters.c.body).where(letters.c.id.in_(chunk))
            )
            bodies.update((row.id, row.body) for row in rows)
        return bodies

    async def _update_letters(
        self,
        conn: Any,
        by_key: dict[tuple[str, str], list[Received]],
        existing: dict[tuple[str, str], int],
        new_keys: set[tuple[str, str]],
        now: datetime,
    ) -> None:
        """Count new occurrences of existing letters and record how they failed last."""
        updates = []
        for key, group in by_key.items():
            if key in new_keys:
                continue
            values = _failure_values(group[-1], now)
            values["b_id"] = existing[key]
            values["b_count"] = len(group)
            values["b_problem"] = next((r.origin_problem for r in group if r.origin_problem), "")
            updates.append(values)
        if not updates:
            return
        columns: dict[str, Any] = {k: bindparam(k) for k in updates[0] if not k.startswith("b_")}
        await conn.execute(
            update(letters)
            .where(letters.c.id == bindparam("b_id"))
            .values(
                occurrences=letters.c.occurrences + bindparam("b_count"),
                origin_problem=func.coalesce(
                    func.nullif(bindparam("b_problem"), ""), letters.c.origin_problem
                ),
                **columns,
            ),
            updates,
        )

    async def _existing(self, conn: Any, keys: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        found: dict[tuple[str, str], int] = {}
        ids = sorted({m for m, _ in keys})
        for chunk in _chunks(ids):
            rows = await conn.execute(
                select(letters.c.id, letters.c.message_id, letters.c.queue).where(
                    letters.c.message_id.in_(chunk)
                )
            )
            for row in rows:
                if (row.message_id, row.queue) in keys:
                    found[(row.message_id, row.queue)] = row.id
        return found

    async def _seen_fingerprints(
        self, conn: Any, batch: Sequence[Received], existing: dict[tuple[str, str], int]
    ) -> set[tuple[int | None, str]]:
        """Occurrences already stored for redelivered messages (commit done, ack lost)."""
        ids = sorted(
            {
                existing[k]
                for r in batch
                if r.redelivered and (k := (r.message_id, r.queue)) in existing
            }
        )
        seen: set[tuple[int | None, str]] = set()
        for chunk in _chunks(ids):
            rows = await conn.execute(
                select(occurrences.c.letter_id, occurrences.c.fingerprint).where(
                    occurrences.c.letter_id.in_(chunk)
                )
            )
            seen.update((row.letter_id, row.fingerprint) for row in rows)
        return seen

    # -- what people do -------------------------------------------------------------

    async def claim(self, ids: Sequence[int], stale_after: timedelta) -> list[int]:
        """Claim open letters for a replay (open → retrying); returns the ids won.

        One conditional UPDATE per chunk: of two callers claiming the same
        letter, exactly one sees it open (SQLite serialises writers; PostgreSQL
        re-checks the condition after the row lock), so a letter is replayed
        once however often it is clicked. A claim older than ``stale_after``
        (its process died mid-replay) can be taken over.
        """
        now = utcnow()
        won: list[int] = []
        async with self.engine.begin() as conn:
            for chunk in _chunks(sorted(set(valid_ids(ids)))):
                result = await conn.execute(
                    update(letters)
                    .where(letters.c.id.in_(chunk))
                    .where(
                        (letters.c.status == Status.OPEN.value)
                        | (
                            (letters.c.status == Status.RETRYING.value)
                            & (letters.c.status_changed_at < now - stale_after)
                        )
                    )
                    .values(status=Status.RETRYING.value, status_changed_at=now)
                    .returning(letters.c.id)
                )
                won.extend(result.scalars().all())
        return won

    async def release(self, ids: Sequence[int]) -> None:
        """Give up claims after replays that were not confirmed (retrying → open)."""
        if not ids:
            return
        async with self.engine.begin() as conn:
            for chunk in _chunks(sorted(set(ids))):
                await conn.execute(
                    update(letters)
                    .where(letters.c.id.in_(chunk), letters.c.status == Status.RETRYING.value)
                    .values(status=Status.OPEN.value, status_changed_at=utcnow())
                )

    async def mark_retried(
        self,
        done: Sequence[tuple[int, int]],
        actor: str,
        *,
        action: str = "retry",
        body: bytes | None = None,
    ) -> None:
        """Record confirmed replays of ``(letter_id, occurrences when replayed)``.

        A letter whose occurrences grew meanwhile has already failed again and
        stays (or becomes) open; the replay is still recorded in its history.
        """
        if not done:
            return
        now = utcnow()
        async with self.engine.begin() as conn:
            await conn.execute(
                update(letters)
                .where(letters.c.id == bindparam("b_id"))
                .where(letters.c.occurrences == bindparam("b_occ"))
                .where(
                    (letters.c.status == Status.OPEN.value)
                    | (letters.c.status == Status.RETRYING.value)
                )
                .values(status=Status.RETRIED.value, status_changed_at=now),
                [{"b_id": i, "b_occ": occ} for i, occ in done],
            )
            for chunk in _chunks([i for i, _ in done]):
                await conn.execute(
                    update(letters)
                    .where(letters.c.id.in_(chunk), letters.c.status == Status.RETRYING.value)
                    .values(status=Status.OPEN.value, status_changed_at=now)
                )
                await conn.execute(
                    update(letters).where(letters.c.id.in_(chunk)).values(last_retried_at=now)
                )
            await conn.execute(
                insert(actions),
                [_action(i, now, actor, action, "ok", "", body) for i, _ in done],
            )

    async def record_failures(
        self,
        failed: Sequence[tuple[int, str]],
        actor: str,
        *,
        action: str = "retry",
        result: str = "failed",
    ) -> None:
        """Record replays that were not confirmed: ``failed`` (refused, returned, not
        encodable) or ``unconfirmed`` (no answer in time: it may still have arrived)."""
        if not failed:
            return
        now = utcnow()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(actions),
                [_action(i, now, actor, action, result, error, None) for i, error in failed],
            )

    async def set_status(self, ids: Sequence[int], status: Status, actor: str) -> list[int]:
        """Archive (open/retried → archived) or restore (archived/retried → open); returns ids."""
        allowed = (
            [Status.OPEN.value, Status.RETRIED.value]
            if status is Status.ARCHIVED
            else [Status.ARCHIVED.value, Status.RETRIED.value]
        )
        action = "archive" if status is Status.ARCHIVED else "restore"
        now = utcnow()
        changed: list[int] = []
        async with self.engine.begin() as conn:
            for chunk in _chunks(valid_ids(ids)):
                result = await conn.execute(
                    update(letters)
                    .where(letters.c.id.in_(chunk), letters.c.status.in_(allowed))
                    .values(status=status.value, status_changed_at=now)
                    .returning(letters.c.id)
                )
                changed.extend(result.scalars().all())
            if changed:
                await conn.execute(
                    insert(actions),
                    [_action(i, now, actor, action, "ok", "", None) for i in changed],
                )
        return changed

    async def purge(self, retention: timedelta) -> int:
        """Delete archived and retried letters untouched for ``retention``; open ones stay."""
        cutoff = utcnow() - retention
        old = (
            select(letters.c.id)
            .where(letters.c.status.in_([Status.ARCHIVED.value, Status.RETRIED.value]))
            .where(letters.c.status_changed_at < cutoff)
        )
        async with self.engine.begin() as conn:
            ids = list((await conn.execute(old)).scalars().all())
            for chunk in _chunks(ids):
                await conn.execute(delete(occurrences).where(occurrences.c.letter_id.in_(chunk)))
                await conn.execute(delete(actions).where(actions.c.letter_id.in_(chunk)))
                await conn.execute(delete(letters).where(letters.c.id.in_(chunk)))
        if ids:
            log.info("store.purged", letters=len(ids), older_than_days=retention.days)
        return len(ids)


def _action(
    letter_id: int, at: datetime, actor: str, action: str, result: str, detail: str, body: Any
) -> dict[str, Any]:
    return {
        "letter_id": letter_id,
        "at": at,
        "actor": actor,
        "action": action,
        "result": result,
        "detail": detail,
        "body": body,
    }


def _upgrade(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
