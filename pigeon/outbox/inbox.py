"""The inbox: a listener's effect, its done mark and its outgoing events in one transaction.

For a listener registered with ``outbox=``, the processor runs the handler
through :func:`run_sync` (sync handler, sync ``Engine``, in the handler's
thread) or :func:`run_async` (async handler, ``AsyncEngine``). Each opens a
transaction, inserts ``(queue, message_id)`` into ``pigeon_inbox`` and, unless
that row already existed (a duplicate: the handler does not run), runs the
handler with ``ctx.session`` bound to the transaction; ``ctx.dispatch`` stores
into the outbox in it. The transaction commits before the message is acked;
an exception rolls back the effect, the inbox row and the outgoing events
alike, and the listener's retry policy takes over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from pigeon.listener import Context
    from pigeon.outbox.box import Outbox


def run_sync(outbox: Outbox, ctx: Context, handler: Any, *args: Any) -> bool:
    """Run a sync handler in a new transaction; False if the message was handled before."""
    with Session(outbox.engine, expire_on_commit=False) as session, session.begin():  # type: ignore[arg-type]
        if not outbox.record(session, ctx.queue, ctx.message_id):
            return False
        ctx.bind_session(outbox, session)
        try:
            handler(*args)
        finally:
            ctx.bind_session(None, None)
    return True


async def run_async(outbox: Outbox, ctx: Context, handler: Any, *args: Any) -> bool:
    """Run an async handler in a new transaction; False if the message was handled before."""
    async with AsyncSession(outbox.engine, expire_on_commit=False) as session, session.begin():  # type: ignore[arg-type]
        if not await outbox.record_async(session, ctx.queue, ctx.message_id):
            return False
        ctx.bind_session(outbox, session)
        try:
            await handler(*args)
        finally:
            ctx.bind_session(None, None)
    return True
