"""Letters, their occurrences, and the actions people took.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "letters",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("message_id", sa.String(), nullable=False),
        sa.Column("queue", sa.String(), nullable=False),
        sa.Column("exchange", sa.String(), nullable=False),
        sa.Column("routing_key", sa.String(), nullable=False),
        sa.Column("event", sa.String(), nullable=False),
        sa.Column("service", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("exception_type", sa.String(), nullable=False),
        sa.Column("exception_message", sa.Text(), nullable=False),
        sa.Column("traceback", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("occurrences", sa.Integer(), nullable=False),
        sa.Column("correlation_id", sa.String(), nullable=True),
        sa.Column("content_type", sa.String(), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("properties", sa.JSON(), nullable=False),
        sa.Column("search_text", sa.Text(), nullable=False),
        sa.Column("failed_at", sa.DateTime(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.Column("last_retried_at", sa.DateTime(), nullable=True),
        sa.Column("status_changed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("message_id", "queue", name="uq_letters_message_queue"),
    )
    for name, columns in (
        ("ix_letters_seen", ["last_seen_at", "id"]),
        ("ix_letters_status_seen", ["status", "last_seen_at", "id"]),
        ("ix_letters_queue_seen", ["queue", "last_seen_at", "id"]),
        ("ix_letters_event_seen", ["event", "last_seen_at", "id"]),
        ("ix_letters_service_seen", ["service", "last_seen_at", "id"]),
        ("ix_letters_reason_seen", ["reason", "last_seen_at", "id"]),
        ("ix_letters_exception_seen", ["exception_type", "last_seen_at", "id"]),
        ("ix_letters_correlation", ["correlation_id"]),
        (
            "ix_letters_groups",
            [
                "status",
                "queue",
                "exception_type",
                "reason",
                "last_seen_at",
                "first_seen_at",
                "last_retried_at",
            ],
        ),
        ("ix_letters_retention", ["status", "status_changed_at"]),
    ):
        op.create_index(name, "letters", columns)

    op.create_table(
        "occurrences",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("letter_id", Id, nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.Column("failed_at", sa.DateTime(), nullable=True),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("exception_type", sa.String(), nullable=False),
        sa.Column("exception_message", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=True),
        sa.Column("replay_of", sa.String(), nullable=True),
        sa.Column("redelivered", sa.Boolean(), nullable=False),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["letter_id"], ["letters.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_occurrences_letter", "occurrences", ["letter_id", "id"])

    op.create_table(
        "actions",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("letter_id", Id, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("result", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(["letter_id"], ["letters.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_actions_letter", "actions", ["letter_id", "id"])


def downgrade() -> None:
    op.drop_table("actions")
    op.drop_table("occurrences")
    op.drop_table("letters")
