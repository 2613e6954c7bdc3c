"""Login sessions kept in the database: what makes a cookie revocable.

A signed cookie alone stays valid until it expires, whoever copied it. The
cookie of a logged-in user therefore only names a row here; logout revokes
the row, and a row opened with other credentials than the current ones (a
restart with a new password) is not accepted.
"""

from __future__ import annotations

from datetime import timedelta
from typing import cast

from sqlalchemy import Table, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from letterthief.models import LoginSession, utcnow

sessions = cast(Table, LoginSession.__table__)


class Sessions:
    def __init__(self, engine: AsyncEngine, max_age: timedelta) -> None:
        self.engine = engine
        self.max_age = max_age

    async def open(self, sid: str, user: str, credentials: str) -> None:
        now = utcnow()
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(sessions).where(
                    or_(
                        sessions.c.created_at < now - self.max_age,
                        sessions.c.revoked_at < now - self.max_age,
                    )
                )
            )
            await conn.execute(
                insert(sessions).values(id=sid, user=user, credentials=credentials, created_at=now)
            )

    async def valid(self, sid: str, user: str, credentials: str) -> bool:
        """Whether ``sid`` is a live session of ``user`` under the current credentials."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(sessions).where(sessions.c.id == sid))).one_or_none()
        return (
            row is not None
            and row.revoked_at is None
            and row.user == user
            and row.credentials == credentials
            and row.created_at > utcnow() - self.max_age
        )

    async def revoke(self, sid: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(sessions)
                .where(sessions.c.id == sid, sessions.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
