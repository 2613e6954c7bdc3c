"""The tables: letters, their occurrences, and what people did to them.

A *letter* is one message (``message_id``) that failed in one queue. Each
time it arrives in the dead-letter queue it adds an *occurrence*; each
retry, edit, archive or restore adds an *action* (who, when, result), which
is the audit log. Timestamps are stored as naive UTC and read back aware, so
SQLite and PostgreSQL behave the same.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Id = BigInteger().with_variant(Integer(), "sqlite")


class Status(enum.StrEnum):
    OPEN = "open"
    RETRYING = "retrying"
    """Claimed by one replay in flight; nobody else may replay it meanwhile."""
    RETRIED = "retried"
    ARCHIVED = "archived"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, whatever the database keeps."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Letter(Base):
    __tablename__ = "letters"
    __table_args__ = (
        UniqueConstraint("message_id", "queue", name="uq_letters_message_queue"),
        Index("ix_letters_seen", "last_seen_at", "id"),
        Index("ix_letters_status_seen", "status", "last_seen_at", "id"),
        Index("ix_letters_queue_seen", "queue", "last_seen_at", "id"),
        Index("ix_letters_event_seen", "event", "last_seen_at", "id"),
        Index("ix_letters_service_seen", "service", "last_seen_at", "id"),
        Index("ix_letters_reason_seen", "reason", "last_seen_at", "id"),
        Index("ix_letters_exception_seen", "exception_type", "last_seen_at", "id"),
        Index("ix_letters_correlation", "correlation_id"),
        Index(
            "ix_letters_groups",
            "status",
            "queue",
            "exception_type",
            "reason",
            "last_seen_at",
            "first_seen_at",
            "last_retried_at",
        ),
        Index("ix_letters_retention", "status", "status_changed_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String)
    queue: Mapped[str] = mapped_column(String)
    exchange: Mapped[str] = mapped_column(String, default="")
    routing_key: Mapped[str] = mapped_column(String, default="")
    event: Mapped[str] = mapped_column(String, default="")
    service: Mapped[str] = mapped_column(String, default="")
    reason: Mapped[str] = mapped_column(String, default="")
    exception_type: Mapped[str] = mapped_column(String, default="")
    exception_message: Mapped[str] = mapped_column(Text, default="")
    traceback: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=Status.OPEN)
    source: Mapped[str] = mapped_column(String(16), default="dead-letter")
    occurrences: Mapped[int] = mapped_column(Integer, default=1)
    correlation_id: Mapped[str | None] = mapped_column(String, nullable=True)
    content_type: Mapped[str | None] = mapped_column(String, nullable=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, Any]] = mapped_column(JSON)
    properties: Mapped[dict[str, Any]] = mapped_column(JSON)
    search_text: Mapped[str] = mapped_column(Text, default="")
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_retried_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    status_changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    origin_problem: Mapped[str] = mapped_column(Text, default="", server_default="")
    """Why the letter's headers disagree with the routing key it arrived under (not replayable)."""


class Occurrence(Base):
    """One arrival of a letter in the dead-letter queue."""

    __tablename__ = "occurrences"
    __table_args__ = (Index("ix_occurrences_letter", "letter_id", "id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    letter_id: Mapped[int] = mapped_column(Id, ForeignKey("letters.id", ondelete="CASCADE"))
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reason: Mapped[str] = mapped_column(String, default="")
    exception_type: Mapped[str] = mapped_column(String, default="")
    exception_message: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int | None] = mapped_column(Integer, nullable=True)
    replay_of: Mapped[str | None] = mapped_column(String, nullable=True)
    redelivered: Mapped[bool] = mapped_column(Boolean, default=False)
    fingerprint: Mapped[str] = mapped_column(String, default="")
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    """This occurrence's body when it differs from the letter's (the first one's); else NULL."""


class Action(Base):
    """Something a person (or the CLI) did to a letter: the retry history and audit log."""

    __tablename__ = "actions"
    __table_args__ = (Index("ix_actions_letter", "letter_id", "id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    letter_id: Mapped[int] = mapped_column(Id, ForeignKey("letters.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String)
    action: Mapped[str] = mapped_column(String(32))
    result: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class LoginSession(Base):
    """A logged-in UI session: the cookie names it, logout revokes it.

    ``credentials`` is a keyed hash of the username and password it was opened
    with; a session of other credentials (changed since) is not accepted.
    """

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String)
    credentials: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
