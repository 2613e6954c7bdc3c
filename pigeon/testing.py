"""Test your services without a broker.

``fake()`` captures every dispatch (of every app, sync or async) instead of
publishing it, and asserts on what was dispatched::

    with pigeon.testing.fake() as bus:
        place_order(...)
        bus.assert_dispatched(OrderPlaced, where=lambda e: e.order_id == "o-1")

``await deliver(app, event, listener=...)`` runs one listener through its
real middleware, retry decision, fallback and idempotency (memory store)
and returns the :class:`~pigeon.delivery.Outcome`. Dispatches the handler
makes are captured, never published.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pigeon import app as app_module
from pigeon import headers as h
from pigeon.app import Pigeon
from pigeon.core.listener import Listener
from pigeon.core.messages import Outgoing
from pigeon.core.processor import Delivery, Outcome, Processor
from pigeon.events import Event, encode_payload, lookup
from pigeon.idempotency import IdempotencyStore, open_store

__all__ = ["Dispatched", "FakeBus", "deliver", "fake"]


@dataclass(frozen=True, slots=True)
class Dispatched:
    """One captured dispatch, as the broker would have received it."""

    name: str
    payload: dict[str, Any]
    message_id: str
    correlation_id: str | None
    causation_id: str | None
    headers: Mapping[str, Any]
    app_id: str | None

    @property
    def event(self) -> Event | dict[str, Any]:
        """The payload as its registered Event class, or the dict when there is none."""
        cls = lookup(self.name)
        return cls.model_validate(self.payload) if cls is not None else self.payload

    def __str__(self) -> str:
        return f"{self.name} {json.dumps(self.payload, default=str)} (message_id={self.message_id})"


Where = Callable[[Any], bool] | Mapping[str, Any] | None


def _name(target: type[Event] | str) -> str:
    return target if isinstance(target, str) else target.event_name()


def _matches(item: Dispatched, where: Where) -> bool:
    if where is None:
        return True
    if callable(where):
        return bool(where(item.event))
    return all(item.payload.get(k) == v for k, v in where.items())


@dataclass
class FakeBus:
    """What was dispatched while the fake was active, with assertions that explain themselves."""

    captured: list[Dispatched] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    async def _record(self, outgoing: Outgoing) -> str:
        payload = json.loads(outgoing.body) if outgoing.body else {}
        item = Dispatched(
            name=outgoing.event_name,
            payload=payload if isinstance(payload, dict) else {"_": payload},
            message_id=outgoing.message_id,
            correlation_id=outgoing.correlation_id,
            causation_id=outgoing.headers.get(h.CAUSATION_ID),
            headers=dict(outgoing.headers),
            app_id=outgoing.app_id,
        )
        with self._lock:
            self.captured.append(item)
        return outgoing.message_id

    def dispatched(
        self, target: type[Event] | str | None = None, where: Where = None
    ) -> list[Dispatched]:
        """Captured dispatches of ``target`` (all when None) that match ``where``."""
        name = None if target is None else _name(target)
        with self._lock:
            items = list(self.captured)
        return [i for i in items if (name is None or i.name == name) and _matches(i, where)]

    def _listing(self) -> str:
        items = self.dispatched()
        if not items:
            return "nothing was dispatched"
        return "dispatched:\n" + "\n".join(f"  - {i}" for i in items)

    def assert_dispatched(
        self, target: type[Event] | str, where: Where = None, *, count: int | None = None
    ) -> list[Dispatched]:
        """At least one (or exactly ``count``) dispatch of ``target`` matching ``where``."""
        found = self.dispatched(target, where)
        if not found or (count is not None and len(found) != count):
            wanted = f"{count} x " if count is not None else ""
            condition = f" where {where}" if where is not None else ""
            raise AssertionError(
                f"expected {wanted}{_name(target)}{condition}, found {len(found)}; {self._listing()}"
            )
        return found

    def assert_not_dispatched(self, target: type[Event] | str, where: Where = None) -> None:
        found = self.dispatched(target, where)
        if found:
            raise AssertionError(
                f"expected no {_name(target)}, found {len(found)}; {self._listing()}"
            )

    def assert_dispatch_count(self, target: type[Event] | str, count: int) -> None:
        found = self.dispatched(target)
        if len(found) != count:
            raise AssertionError(
                f"expected {count} x {_name(target)}, found {len(found)}; {self._listing()}"
            )

    def assert_nothing_dispatched(self) -> None:
        if self.dispatched():
            raise AssertionError(f"expected nothing dispatched; {self._listing()}")

    def clear(self) -> None:
        with self._lock:
            self.captured.clear()


@contextmanager
def fake() -> Iterator[FakeBus]:
    """Capture every dispatch instead of publishing it, until the block ends."""
    bus = FakeBus()
    previous = app_module.set_sink(bus._record)
    try:
        yield bus
    finally:
        app_module.set_sink(previous)


_stores: dict[int, IdempotencyStore] = {}


async def _memory_store(app: Pigeon) -> IdempotencyStore:
    store = _stores.get(id(app))
    if store is None:
        store = _stores[id(app)] = open_store("memory://")
        await store.open()
    return store


def _find(app: Pigeon, event: Event | str, listener: Listener | str | None) -> Listener:
    if isinstance(listener, Listener):
        return listener
    if listener is not None:
        return app.find_listeners([listener])[0]
    name = event if isinstance(event, str) else type(event).event_name()
    from pigeon.core.topology import matches

    candidates = [li for li in app.listeners if any(matches(p, name) for p in li.patterns)]
    if len(candidates) != 1:
        raise LookupError(
            f"{len(candidates)} listeners of {app!r} take {name}; pass listener=NAME "
            f"(one of {', '.join(li.name for li in app.listeners)})"
        )
    return candidates[0]


async def deliver(
    app: Pigeon,
    event: Event | str,
    payload: Mapping[str, Any] | bytes | None = None,
    *,
    listener: Listener | str | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
    headers: Mapping[str, Any] | None = None,
    attempt: int = 1,
    content_type: str = "application/json",
    store: IdempotencyStore | None = None,
) -> Outcome:
    """Run one message through ``listener`` exactly as the worker would, without a broker.

    ``payload`` may be raw bytes to test what a broken producer sends. The
    same app keeps one memory idempotency store, so delivering the same
    ``message_id`` twice yields a ``duplicate`` outcome.
    """
    target = _find(app, event, listener)
    message_id = message_id or str(uuid.uuid4())  # as dispatch: it is the correlation id too
    if isinstance(event, Event):
        name, body = type(event).event_name(), event.to_json()
    else:
        name = event
        body = payload if isinstance(payload, bytes) else encode_payload(dict(payload or {}))
    all_headers = dict(headers or {})
    if attempt > 1:
        all_headers[h.ATTEMPT] = attempt
    processor = Processor(
        target,
        store=store or await _memory_store(app),
        max_body_bytes=app.settings.max_body_bytes,
    )
    delivery = Delivery.create(
        target,
        body,
        event_name=name,
        message_id=message_id,
        headers=all_headers,
        correlation_id=correlation_id or message_id,
        content_type=content_type,
    )
    if app_module.sink() is not None:
        return await processor.process(delivery)
    with fake():
        return await processor.process(delivery)
