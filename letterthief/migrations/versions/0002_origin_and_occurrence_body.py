"""Where a letter came from when its headers disagree, and each occurrence's own body.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("letters") as batch:
        batch.add_column(sa.Column("origin_problem", sa.Text(), nullable=False, server_default=""))
    with op.batch_alter_table("occurrences") as batch:
        batch.add_column(sa.Column("body", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("occurrences") as batch:
        batch.drop_column("body")
    with op.batch_alter_table("letters") as batch:
        batch.drop_column("origin_problem")
