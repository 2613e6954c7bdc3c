"""Transactional outbox and inbox on SQLAlchemy 2 (PostgreSQL, SQLite).

An event is announced if and only if the transaction that stored it
committed, and a listener with ``outbox=`` takes effect once per message.
See docs/outbox.md. SQLAlchemy is imported on first use of a name, so the
``pigeon`` CLI starts as fast as before for everything else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pigeon.outbox.box import Outbox
    from pigeon.outbox.relay import Relay, purge, status
    from pigeon.outbox.tables import make_tables

__all__ = ["Outbox", "Relay", "make_tables", "purge", "status"]

_HOMES = {
    "Outbox": "pigeon.outbox.box",
    "Relay": "pigeon.outbox.relay",
    "make_tables": "pigeon.outbox.tables",
    "purge": "pigeon.outbox.relay",
    "status": "pigeon.outbox.relay",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pigeon.outbox' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
