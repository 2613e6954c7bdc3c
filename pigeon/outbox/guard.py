"""What ``pigeon listen`` checks of its listeners' outboxes before it consumes.

A missing table is a mistake, not an outage: without it every message would
fail its inbox insert through the retries into the dead letters while the
relay logged a warning every few seconds. The worker refuses to start instead
(:class:`~pigeon.errors.ConfigurationError`: one line, exit 78). A database that
does not answer is an outage: the worker starts, its relay backs off and the
messages are retried until the database is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect
from sqlalchemy.exc import DBAPIError

from pigeon.errors import ConfigurationError
from pigeon.logs import get_logger
from pigeon.outbox.box import Outbox

if TYPE_CHECKING:
    from pigeon.core.listener import TransactionalOutbox

log = get_logger("pigeon")

CHECK_TIMEOUT = 15.0
"""Seconds the look may take (``pigeon outbox status`` waits as long); the connection
attempt itself gives up sooner (the relay engine's connect timeout)."""


async def check_tables(outboxes: Sequence[TransactionalOutbox]) -> None:
    """Raise :class:`ConfigurationError` if a database answers without an outbox's tables.

    Each distinct :class:`~pigeon.outbox.Outbox` is looked at once, through its
    relay engine (bounded by ``CHECK_TIMEOUT``); one that cannot be reached
    is logged (``outbox.check_skipped``) and left to the relay's backoff.
    """
    seen: set[int] = set()
    for box in outboxes:
        if not isinstance(box, Outbox) or id(box) in seen:
            continue
        seen.add(id(box))
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                async with box.relay_engine().connect() as conn:
                    missing = await conn.run_sync(_missing, box)
        except (DBAPIError, OSError) as exc:  # TimeoutError included
            if "unable to open database file" in str(exc):
                await box.close()
                raise ConfigurationError(
                    f"cannot open the SQLite file of {box.engine.url!r} (does its directory exist?)"
                ) from None
            log.warning("outbox.check_skipped", table=box.table.name, error=repr(exc))
            continue
        if missing:
            await box.close()  # the relay engine it made for this look
            verb = "do" if len(missing) > 1 else "does"
            raise ConfigurationError(
                f"{' and '.join(missing)} {verb} not exist in {box.engine.url!r}: call "
                "outbox.create_tables() (create_tables_async() for an AsyncEngine), "
                "run `pigeon outbox relay URL --create-tables` once, or add the tables "
                "to your migrations (docs/outbox.md)"
            )


def _missing(conn: Any, box: Outbox) -> list[str]:
    """The tables of ``box`` the database lacks, as "outbox table NAME"."""
    inspector = inspect(conn)
    tables = (("outbox", box.table.name), ("inbox", box.inbox.name))
    return [f"{kind} table {name}" for kind, name in tables if not inspector.has_table(name)]
