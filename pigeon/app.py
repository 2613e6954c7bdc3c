"""The app: a service's name, its settings, its listeners, and its connections.

One :class:`Pigeon` per service. ``@app.listener`` registers handlers;
``app.dispatch`` / ``await app.dispatch_async`` publish. The module-level
:func:`dispatch` uses a default app configured from ``PIGEON_*`` variables.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Unpack

from aio_pika.abc import AbstractConnection

from pigeon.amqp import Connector, Publisher, declare
from pigeon.bridge import bridge, on_bridge_shutdown
from pigeon.core import topology as topo
from pigeon.core.listener import (
    DEFAULT_TIMEOUT,
    Handler,
    Listener,
    TransactionalOutbox,
    default_listener_name,
    inspect_handler,
    pattern_of,
)
from pigeon.core.messages import DispatchOptions, build_outgoing
from pigeon.errors import ConfigurationError
from pigeon.events import Event
from pigeon.metrics import DISPATCHED
from pigeon.middleware import (
    Metrics,
    Middleware,
    PublishMiddleware,
    PublishNext,
    publish_chain,
    tracing,
)
from pigeon.retry import Retry
from pigeon.settings import Settings

_UNSET: Any = object()


class Runtime:
    """An app's connection and publisher on one event loop of one process."""

    def __init__(self, app: Pigeon, loop: asyncio.AbstractEventLoop) -> None:
        self.pid = os.getpid()
        self.loop = loop
        self.connector = Connector.for_settings(
            app.settings, name=app.service or "pigeon", on_connect=[app.declare_core]
        )
        self.publisher = Publisher(self.connector, timeout=app.settings.dispatch_timeout)
        self.keeper: AsyncIterator[None] | None = None
        self.started: asyncio.Future[None] | None = None

    async def close(self) -> None:
        await self.publisher.close()
        await self.connector.close()


_apps: weakref.WeakSet[Pigeon] = weakref.WeakSet()
_sink: PublishNext | None = None


def set_sink(sink: PublishNext | None) -> PublishNext | None:
    """Send every dispatch of every app to ``sink`` instead of the broker (the testing
    fake uses it); returns the previous sink. ``None`` sends to the broker again."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def sink() -> PublishNext | None:
    """The sink :func:`set_sink` installed, or ``None`` when dispatches go to the broker."""
    return _sink


class Pigeon:
    """A service on the bus.

    ``service`` names the app (the ``app_id`` of what it dispatches and the
    first part of its queue names); it defaults to ``PIGEON_SERVICE``. ``url``
    overrides ``PIGEON_URL``.
    """

    def __init__(
        self,
        service: str | None = None,
        *,
        url: str | None = None,
        settings: Settings | None = None,
        middleware: Sequence[Middleware] | None = None,
        publish_middleware: Sequence[PublishMiddleware] | None = None,
        dispatches: Sequence[type[Event] | str] = (),
    ) -> None:
        settings = settings or Settings()
        if url is not None:
            settings = settings.model_copy(update={"url": url})
        self.settings = settings
        self.service = service or settings.service
        self.listeners: list[Listener] = []
        self.middleware: list[Middleware] = (
            [*tracing.default_middleware(), Metrics()] if middleware is None else list(middleware)
        )
        self.publish_middleware: list[PublishMiddleware] = (
            [*tracing.default_publish_middleware()]
            if publish_middleware is None
            else list(publish_middleware)
        )
        self.dispatches = list(dispatches)
        self._runtimes: dict[asyncio.AbstractEventLoop, Runtime] = {}
        _apps.add(self)

    def __repr__(self) -> str:
        return f"<Pigeon service={self.service!r} listeners={len(self.listeners)}>"

    # -- listeners -----------------------------------------------------------------

    def listener(
        self,
        *targets: type[Event] | str,
        queue: str | None = None,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = _UNSET,
        concurrency: int | None = None,
        idempotent: bool = True,
        lease: float | None = None,
        delivery_limit: int = topo.DEFAULT_DELIVERY_LIMIT,
        max_body_bytes: int | None = None,
        middleware: Sequence[Middleware] | None = None,
        outbox: TransactionalOutbox | None = None,
    ) -> Callable[[Handler], Listener]:
        """Register a handler for events (classes), names or patterns (``order.*``, ``#``).

        The handler takes ``(event)`` or ``(event, ctx)``; annotate ``event`` with an
        :class:`Event` subclass for a validated model or ``dict`` for the raw payload.
        With ``outbox=``, each message runs in a transaction of the outbox's database
        (``ctx.session``) that also records it in the inbox (see docs/outbox.md).
        """
        if not targets:
            raise ConfigurationError("@app.listener(...) needs at least one event or pattern")
        patterns = tuple(pattern_of(t) for t in targets)

        def register(handler: Handler) -> Listener:
            event_type, wants_dict, takes_context, is_async, context_first = inspect_handler(
                handler, targets
            )
            listener_name = name or default_listener_name(handler)
            if queue is None and not self.service:
                raise ConfigurationError(
                    f"listener {listener_name} needs a queue name: give the app a service "
                    "(Pigeon(service='orders') or PIGEON_SERVICE) or pass queue=..."
                )
            queue_name = queue or f"{self.service}.{listener_name}"
            if outbox is not None:
                outbox.check_handler(listener_name, is_async=is_async)
            if any(existing.queue == queue_name for existing in self.listeners):
                raise ConfigurationError(
                    f"two listeners would share queue {queue_name}; pass name= or queue="
                )
            listener = Listener(
                app=self,
                handler=handler,
                patterns=patterns,
                name=listener_name,
                queue=queue_name,
                retry=retry or Retry(),
                timeout=DEFAULT_TIMEOUT if timeout is _UNSET else timeout,
                concurrency=concurrency,
                idempotent=idempotent,
                lease=lease,
                delivery_limit=delivery_limit,
                max_body_bytes=max_body_bytes,
                middleware=middleware,
                event_type=event_type,
                wants_dict=wants_dict,
                takes_context=takes_context,
                is_async=is_async,
                context_first=context_first,
                outbox=outbox,
            )
            self.listeners.append(listener)
            return listener

        return register

    def find_listeners(self, names: Sequence[str] = ()) -> list[Listener]:
        """The listeners called ``names`` (all when empty); unknown names raise."""
        if not names:
            return list(self.listeners)
        by_name = {listener.name: listener for listener in self.listeners}
        unknown = [n for n in names if n not in by_name and n.replace("_", "-") not in by_name]
        if unknown:
            raise ConfigurationError(
                f"no listener named {', '.join(unknown)}; "
                f"this app has {', '.join(by_name) or 'none'}"
            )
        return [by_name.get(n) or by_name[n.replace("_", "-")] for n in names]

    # -- topology ------------------------------------------------------------------

    def topology(self, listeners: Sequence[Listener] | None = None) -> topo.Topology:
        """Everything this app declares: the core exchanges and each listener's queues."""
        result = topo.core_topology(self.settings)
        for listener in self.listeners if listeners is None else listeners:
            result += self.listener_topology(listener)
        return result

    def listener_topology(self, listener: Listener) -> topo.Topology:
        main = topo.listener_queue(
            self.settings,
            listener.queue,
            listener.patterns,
            delivery_limit=listener.delivery_limit,
            purpose=f"listener {listener.name}",
        )
        tiers = tuple(
            topo.retry_tier(listener.queue, d, quorum_size=self.settings.quorum_size)
            for d in listener.retry.tier_delays()
        )
        return topo.Topology(queues=(main, *tiers))

    async def declare_core(self, connection: AbstractConnection) -> None:
        await declare(connection, topo.core_topology(self.settings))

    async def declare(self, listeners: Sequence[Listener] | None = None) -> None:
        """Declare this app's whole topology now (``pigeon topology declare``)."""
        connection = await self.runtime().connector.get()
        await declare(connection, self.topology(listeners))

    # -- dispatch ------------------------------------------------------------------

    def runtime(self) -> Runtime:
        """This app's connection and publisher for the running event loop."""
        loop = asyncio.get_running_loop()
        runtime = self._runtimes.get(loop)
        if runtime is None or runtime.pid != os.getpid():
            runtime = self._runtimes[loop] = Runtime(self, loop)
            _close_at_loop_end(self, runtime)
        return runtime

    async def dispatch_async(
        self,
        event: Event | str,
        payload: Mapping[str, Any] | None = None,
        **options: Unpack[DispatchOptions],
    ) -> str:
        """Publish an event and return its message id once the broker confirmed it.

        Keywords (all optional): ``message_id``, ``correlation_id``,
        ``causation_id``, ``headers`` (:class:`~pigeon.core.messages.DispatchOptions`).
        Raises :class:`pigeon.DispatchError` if the broker could not confirm it
        within ``PIGEON_DISPATCH_TIMEOUT`` seconds.
        """
        outgoing = build_outgoing(self.settings.exchange, self.service, event, payload, **options)
        send = _sink if _sink is not None else self.runtime().publisher.publish
        if self.publish_middleware:
            message_id = await publish_chain(self.publish_middleware, send)(outgoing)
        else:
            message_id = await send(outgoing)
        DISPATCHED.labels(outgoing.event_name).inc()
        return message_id

    async def dispatch_many(
        self,
        events: Iterable[Event | tuple[str, Mapping[str, Any]]],
        *,
        message_ids: Sequence[str] | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Publish many events at once and return their ids once the broker confirmed all.

        Much faster than awaiting ``dispatch_async`` one by one: every confirm is
        in flight together. Publish middleware does not run here; use
        ``dispatch_async`` when it must. ``message_ids`` (one per event) fixes
        the ids, so a batch can be sent again without creating copies its
        listeners cannot skip. Raises :class:`pigeon.DispatchManyError` if any
        event could not be confirmed within the dispatch timeout: its
        ``confirmed`` and ``unconfirmed`` list the ids (the unconfirmed may
        have been stored: retry them with the same ids).
        """
        items = list(events)
        ids: Sequence[str | None] = [None] * len(items) if message_ids is None else message_ids
        if len(ids) != len(items):
            raise ValueError(
                f"dispatch_many got {len(items)} events and {len(ids)} message_ids; "
                "pass one id per event"
            )
        batch = [
            build_outgoing(
                self.settings.exchange,
                self.service,
                *(item if isinstance(item, tuple) else (item, None)),
                message_id=message_id,
                correlation_id=correlation_id,
                causation_id=causation_id,
                headers=headers,
            )
            for item, message_id in zip(items, ids, strict=True)
        ]
        if not batch:
            return []
        if _sink is not None:
            return [await _sink(out) for out in batch]
        confirmed = await self.runtime().publisher.publish_many(batch)
        for out in batch:
            DISPATCHED.labels(out.event_name).inc()
        return confirmed

    def dispatch(
        self,
        event: Event | str,
        payload: Mapping[str, Any] | None = None,
        **options: Unpack[DispatchOptions],
    ) -> str:
        """The blocking form of :meth:`dispatch_async`, for sync code and threads."""
        return bridge().run(self.dispatch_async(event, payload, **options))

    async def close_runtime(self, runtime: Runtime) -> None:
        """Close ``runtime`` (from :meth:`runtime`) and forget it, if it is still this app's.

        The worker closes its own connection with it when its run ends.
        """
        await runtime.close()
        if self._runtimes.get(runtime.loop) is runtime:
            del self._runtimes[runtime.loop]

    async def close(self) -> None:
        """Close this app's connection on the running loop; the next dispatch opens a new one.

        A connection left open is also closed when ``asyncio.run()`` ends its
        loop, but calling this (or ``async with app:``) says when.
        """
        runtime = self._runtimes.pop(asyncio.get_running_loop(), None)
        if runtime is not None and runtime.pid == os.getpid():
            await runtime.close()

    async def __aenter__(self) -> Pigeon:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _close_at_loop_end(app: Pigeon, runtime: Runtime) -> None:
    """Close ``runtime`` when its loop shuts down (``asyncio.run()`` ends).

    A loop has no close hook, but ``asyncio.run()`` finalizes every async
    generator still open on it (``loop.shutdown_asyncgens``) before closing:
    one parked at its ``yield`` closes the connection in its ``finally``. The
    generator holds the app weakly, so it never keeps an app alive.
    """
    ref = weakref.ref(app)

    async def keeper() -> AsyncIterator[None]:
        try:
            yield
        finally:
            owner = ref()
            if owner is not None and owner._runtimes.get(runtime.loop) is runtime:
                owner._runtimes.pop(runtime.loop, None)
                await runtime.close()

    generator = keeper()
    runtime.keeper = generator
    runtime.started = asyncio.ensure_future(anext(generator))


async def close_runtimes_on(loop: asyncio.AbstractEventLoop) -> None:
    """Close every app's connection that lives on ``loop`` (used at interpreter exit)."""
    for app in list(_apps):
        runtime = app._runtimes.pop(loop, None)
        if runtime is not None and runtime.pid == os.getpid():
            await runtime.close()


on_bridge_shutdown(close_runtimes_on)

_default: Pigeon | None = None


def default_app() -> Pigeon:
    """The app behind :func:`pigeon.dispatch`, configured from the environment."""
    global _default
    if _default is None:
        _default = Pigeon()
    return _default


def set_default_app(app: Pigeon | None) -> None:
    """Make ``app`` the one module-level :func:`dispatch` uses (``None`` resets it)."""
    global _default
    _default = app


def dispatch(
    event: Event | str,
    payload: Mapping[str, Any] | None = None,
    **options: Unpack[DispatchOptions],
) -> str:
    """Publish with the default app and block until confirmed; see :meth:`Pigeon.dispatch_async`."""
    return default_app().dispatch(event, payload, **options)


async def dispatch_async(
    event: Event | str,
    payload: Mapping[str, Any] | None = None,
    **options: Unpack[DispatchOptions],
) -> str:
    """Publish with the default app; returns the message id after the broker's confirm."""
    return await default_app().dispatch_async(event, payload, **options)


async def close() -> None:
    """Close the default app's connection on the running loop (see :meth:`Pigeon.close`)."""
    if _default is not None:
        await _default.close()
