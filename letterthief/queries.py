"""The read side of the store: filters, keyset pages, failure groups, a letter's detail.

Lists are ordered newest failure first (``last_seen_at``, then ``id``) and
paged by keyset (an opaque cursor), so page 500 costs what page 1 costs.
Every filter has an index that starts with its column.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import load_only
from sqlalchemy.sql.elements import ColumnElement

from letterthief.models import Action, Letter, Occurrence, Status

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

LIST_COLUMNS = (
    Letter.id,
    Letter.message_id,
    Letter.queue,
    Letter.exchange,
    Letter.routing_key,
    Letter.event,
    Letter.service,
    Letter.reason,
    Letter.exception_type,
    Letter.exception_message,
    Letter.attempts,
    Letter.status,
    Letter.source,
    Letter.occurrences,
    Letter.correlation_id,
    Letter.content_type,
    Letter.failed_at,
    Letter.first_seen_at,
    Letter.last_seen_at,
    Letter.last_retried_at,
    Letter.status_changed_at,
    Letter.origin_problem,
)
MAX_LIMIT = 500
MAX_ID = 2**63 - 1
"""Letter ids are 64-bit integers; a larger one names no letter (and would overflow a query)."""


def valid_ids(ids: Sequence[int]) -> list[int]:
    """The ids that can name a letter (1 … 2**63-1)."""
    return [i for i in ids if 0 < i <= MAX_ID]


class BadCursor(ValueError):
    """The ``cursor`` parameter was not one this service handed out."""


@dataclass(frozen=True, slots=True)
class Filters:
    """The list filters; empty strings count as "any"."""

    queue: str | None = None
    event: str | None = None
    service: str | None = None
    reason: str | None = None
    status: str | None = None
    exception_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        out: list[ColumnElement[bool]] = []
        for name in ("queue", "event", "service", "reason", "status", "exception_type"):
            value = getattr(self, name)
            if value:
                out.append(getattr(Letter, name) == value)
        if self.since:
            out.append(Letter.last_seen_at >= self.since)
        if self.until:
            out.append(Letter.last_seen_at < self.until)
        if self.q and self.q.strip():
            out.append(Letter.search_text.contains(self.q.strip().lower(), autoescape=True))
        return out

    def params(self) -> dict[str, str]:
        """The filters that are set, as query parameters (for links that keep them)."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                out[f.name] = value.isoformat()
            elif value:
                out[f.name] = str(value)
        return out


@dataclass(slots=True)
class Page:
    items: list[Letter]
    total: int
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Group:
    """Open letters of one queue failing with one exception type (and reason)."""

    queue: str
    exception_type: str
    reason: str
    count: int
    first_seen_at: datetime
    last_seen_at: datetime
    last_retried_at: datetime | None
    event: str = ""
    exception_message: str = ""


@dataclass(slots=True)
class Detail:
    letter: Letter
    occurrences: list[Occurrence] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    conversation: list[Letter] = field(default_factory=list)


def encode_cursor(letter: Letter) -> str:
    raw = f"{letter.last_seen_at.isoformat()}|{letter.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, _, ident = raw.partition("|")
        return datetime.fromisoformat(when), int(ident)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadCursor(f"cursor {cursor!r} is not valid; start again without it") from exc


class Queries:
    sessions: async_sessionmaker[AsyncSession]

    async def page(self, filters: Filters, *, limit: int = 50, cursor: str | None = None) -> Page:
        """One page of letters (without bodies), newest first, and the filtered total."""
        limit = max(1, min(limit, MAX_LIMIT))
        conditions = filters.conditions()
        query = select(Letter).options(load_only(*LIST_COLUMNS)).where(*conditions)
        if cursor:
            when, ident = decode_cursor(cursor)
            query = query.where(
                or_(
                    Letter.last_seen_at < when,
                    and_(Letter.last_seen_at == when, Letter.id < ident),
                )
            )
        query = query.order_by(Letter.last_seen_at.desc(), Letter.id.desc()).limit(limit + 1)
        async with self.sessions() as session:
            items = list((await session.scalars(query)).all())
            total = await session.scalar(
                select(func.count()).select_from(Letter).where(*conditions)
            )
        next_cursor = encode_cursor(items[limit - 1]) if len(items) > limit else None
        return Page(items[:limit], int(total or 0), next_cursor)

    async def ids(self, filters: Filters, limit: int = 100_000) -> list[int]:
        """Ids of every letter matching ``filters`` (a group, a queue), oldest first."""
        query = (
            select(Letter.id)
            .where(*filters.conditions())
            .order_by(Letter.last_seen_at, Letter.id)
            .limit(limit)
        )
        async with self.sessions() as session:
            return list((await session.scalars(query)).all())

    async def group_ids(self, queue: str, exception_type: str, reason: str) -> list[int]:
        """Ids of the open letters of one failure group (exact match, empty type included)."""
        query = select(Letter.id).where(
            Letter.status == Status.OPEN.value,
            Letter.queue == queue,
            Letter.exception_type == exception_type,
            Letter.reason == reason,
        )
        async with self.sessions() as session:
            return list((await session.scalars(query.order_by(Letter.id))).all())

    async def get(self, letter_id: int) -> Letter | None:
        if not valid_ids([letter_id]):
            return None
        async with self.sessions() as session:
            return await session.get(Letter, letter_id)

    async def get_many(self, ids: Sequence[int]) -> list[Letter]:
        ids = valid_ids(ids)
        async with self.sessions() as session:
            found = await session.scalars(select(Letter).where(Letter.id.in_(list(ids))))
            by_id = {letter.id: letter for letter in found}
        return [by_id[i] for i in ids if i in by_id]

    async def detail(self, letter_id: int, *, history: int = 100) -> Detail | None:
        """A letter with its latest occurrences, its actions and its conversation."""
        if not valid_ids([letter_id]):
            return None
        async with self.sessions() as session:
            letter = await session.get(Letter, letter_id)
            if letter is None:
                return None
            occ = await session.scalars(
                select(Occurrence)
                .where(Occurrence.letter_id == letter_id)
                .order_by(Occurrence.id.desc())
                .limit(history)
            )
            acts = await session.scalars(
                select(Action)
                .where(Action.letter_id == letter_id)
                .order_by(Action.id.desc())
                .limit(history)
            )
            conversation: list[Letter] = []
            if letter.correlation_id:
                conversation = list(
                    (
                        await session.scalars(
                            select(Letter)
                            .options(load_only(*LIST_COLUMNS))
                            .where(Letter.correlation_id == letter.correlation_id)
                            .where(Letter.id != letter_id)
                            .order_by(Letter.first_seen_at, Letter.id)
                            .limit(50)
                        )
                    ).all()
                )
            return Detail(letter, list(occ.all()), list(acts.all()), conversation)

    async def groups(self, status: str = Status.OPEN.value, limit: int = 200) -> list[Group]:
        """Failure groups (queue, exception type and reason), most recently failing first."""
        last_seen = func.max(Letter.last_seen_at)
        query = (
            select(
                Letter.queue,
                Letter.exception_type,
                Letter.reason,
                func.count(),
                func.min(Letter.first_seen_at),
                last_seen,
                func.max(Letter.last_retried_at),
            )
            .where(Letter.status == status)
            .group_by(Letter.queue, Letter.exception_type, Letter.reason)
            .order_by(last_seen.desc())
            .limit(limit)
        )
        out: list[Group] = []
        async with self.sessions() as session:
            rows = (await session.execute(query)).all()
            for queue, exc_type, reason, count, first, last, retried in rows:
                sample = (
                    await session.execute(
                        select(Letter.event, Letter.exception_message)
                        .where(
                            Letter.status == status,
                            Letter.queue == queue,
                            Letter.exception_type == exc_type,
                            Letter.reason == reason,
                        )
                        .order_by(Letter.last_seen_at.desc())
                        .limit(1)
                    )
                ).first()
                event, message = (sample[0], sample[1]) if sample else ("", "")
                out.append(
                    Group(
                        queue,
                        exc_type,
                        reason,
                        count,
                        _aware(first),
                        _aware(last),
                        _aware(retried) if retried else None,
                        event,
                        message,
                    )
                )
        return out

    async def counts(self) -> list[tuple[str, str, int]]:
        """(status, queue, letters) for the metrics endpoint."""
        query = select(Letter.status, Letter.queue, func.count()).group_by(
            Letter.status, Letter.queue
        )
        async with self.sessions() as session:
            return [(s, q, int(n)) for s, q, n in (await session.execute(query)).all()]

    async def status_totals(self) -> dict[str, int]:
        query = select(Letter.status, func.count()).group_by(Letter.status)
        async with self.sessions() as session:
            totals = {s.value: 0 for s in Status}
            totals.update({s: int(n) for s, n in (await session.execute(query)).all()})
            return totals

    async def distinct(self, column: str) -> list[str]:
        """Values seen in a filterable column (for the filter drop-downs)."""
        col: Any = getattr(Letter, column)
        async with self.sessions() as session:
            rows = await session.scalars(select(col).distinct().order_by(col).limit(500))
            return [v for v in rows.all() if v]


def _aware(value: datetime) -> datetime:
    """Aggregates bypass the column type; re-attach UTC where the driver dropped it."""
    from datetime import UTC

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
