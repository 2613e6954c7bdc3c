"""Listeners: a handler function, the events it is bound to, and its policies.

``@app.listener(...)`` returns a :class:`Listener`. It is still callable like
the function it wraps (handy in unit tests), and carries everything the
worker needs: queue name, bindings, retry policy, timeout, fallback.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import typing
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Unpack

import structlog

from pigeon.core.pipeline import Wrapper
from pigeon.errors import ConfigurationError
from pigeon.events import Event, validate_event_name
from pigeon.logs import get_logger
from pigeon.retry import Retry

if TYPE_CHECKING:
    from pigeon.core.messages import DispatchOptions, OutboxOptions, Outgoing
    from pigeon.settings import Settings

Handler = Callable[..., Any]
Fallback = Callable[[Any, "Context", BaseException], Any]
AnyMiddleware = Wrapper[Any, None]
"""A consume middleware (:class:`pigeon.middleware.Middleware`), as a listener holds it.

Typed loosely here because the delivery it takes names its listener: the
precise protocol lives in :mod:`pigeon.middleware`, one layer up."""


class ListenerApp(Protocol):
    """What a listener and its handler's context need of their app.

    A :class:`pigeon.Pigeon` is one; the listener does not import it, so the
    data objects below the app never point up at it.
    """

    @property
    def service(self) -> str | None: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def middleware(self) -> Sequence[AnyMiddleware]: ...

    @property
    def publish_middleware(self) -> Sequence[Wrapper[Outgoing, str]]: ...

    def dispatch(
        self,
        event: Event | str,
        payload: Mapping[str, Any] | None = None,
        **options: Unpack[DispatchOptions],
    ) -> str: ...

    def dispatch_async(
        self,
        event: Event | str,
        payload: Mapping[str, Any] | None = None,
        **options: Unpack[DispatchOptions],
    ) -> Coroutine[Any, Any, str]: ...


DEFAULT_TIMEOUT = 600.0
DEFAULT_LEASE = 30.0


def pattern_of(target: type[Event] | str) -> str:
    """The binding key for an event class, an event name or a topic pattern (``order.*``)."""
    if isinstance(target, str):
        if any(word in ("*", "#") for word in target.split(".")):
            return target
        return validate_event_name(target)
    if isinstance(target, type) and issubclass(target, Event):
        return target.event_name()
    raise ConfigurationError(f"listen to an Event subclass or an event name, not {target!r}")


class TransactionalOutbox(Protocol):
    """What a listener registered with ``outbox=`` needs of it.

    :class:`pigeon.outbox.Outbox` is one. The outbox layer sits above the
    app (its relay publishes through one), so the core reaches it through
    this protocol and never imports it.
    """

    def check_handler(self, listener: str, *, is_async: bool) -> None: ...

    def run_sync(self, ctx: Context, handler: Handler, *args: Any) -> bool: ...

    async def run_async(self, ctx: Context, handler: Handler, *args: Any) -> bool: ...

    def dispatch(
        self,
        session: Any,
        event: Event | str,
        payload: Mapping[str, Any] | None = None,
        *,
        app: ListenerApp | None = None,
        **options: Unpack[OutboxOptions],
    ) -> str: ...

    async def dispatch_async(
        self,
        session: Any,
        event: Event | str,
        payload: Mapping[str, Any] | None = None,
        *,
        app: ListenerApp | None = None,
        **options: Unpack[OutboxOptions],
    ) -> str: ...


class Context:
    """What a handler knows about the message it is handling.

    ``dispatch`` propagates the correlation id and records this message as the
    cause of the new event, so "what happened to order 42" can be followed
    across services. Use ``await ctx.dispatch(...)`` in async handlers and
    ``ctx.dispatch_sync(...)`` in sync ones.
    """

    __slots__ = (
        "_app",
        "_log",
        "_loop",
        "_loop_thread",
        "_outbox",
        "attempt",
        "causation_id",
        "correlation_id",
        "event_name",
        "headers",
        "listener",
        "message_id",
        "queue",
        "redelivered",
        "session",
    )

    def __init__(
        self,
        *,
        app: ListenerApp,
        message_id: str,
        event_name: str,
        correlation_id: str | None,
        causation_id: str | None,
        headers: Mapping[str, Any],
        attempt: int,
        redelivered: bool,
        queue: str,
        listener: str,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._app = app
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self.message_id = message_id
        self.event_name = event_name
        self.correlation_id = correlation_id
        self.causation_id = causation_id
        self.headers = headers
        self.attempt = attempt
        self.redelivered = redelivered
        self.queue = queue
        self.listener = listener
        self._log: structlog.typing.FilteringBoundLogger | None = None
        self._outbox: TransactionalOutbox | None = None
        self.session: Any = None
        """For a listener with ``outbox=``: the SQLAlchemy session of this message's
        transaction (``Session`` or ``AsyncSession``); None otherwise."""

    def bind_session(self, outbox: TransactionalOutbox | None, session: Any) -> None:
        """Route ``dispatch`` into ``outbox`` within ``session`` (the inbox does this)."""
        self._outbox, self.session = outbox, session

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """A logger bound to this message's queue, event, ids and attempt."""
        if self._log is None:
            self._log = get_logger("pigeon").bind(
                queue=self.queue,
                listener=self.listener,
                event_name=self.event_name,
                message_id=self.message_id,
                correlation_id=self.correlation_id,
                causation_id=self.causation_id,
                attempt=self.attempt,
            )
        return self._log

    def _dispatch_kwargs(self, kwargs: DispatchOptions) -> DispatchOptions:
        kwargs.setdefault("correlation_id", self.correlation_id or self.message_id)
        kwargs.setdefault("causation_id", self.message_id)
        return kwargs

    def dispatch(
        self,
        event: Event | str,
        payload: Mapping[str, Any] | None = None,
        **kwargs: Unpack[DispatchOptions],
    ) -> Coroutine[Any, Any, str]:
        """Dispatch an event caused by this one; await it. Returns the new message id."""
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            raise RuntimeError(
                "ctx.dispatch() must be awaited on the worker's event loop; "
                "from a sync handler call ctx.dispatch_sync(...) instead"
            )
        if self._outbox is not None:
            return self._outbox.dispatch_async(
                self.session, event, payload, app=self._app, **self._dispatch_kwargs(kwargs)
            )
        return self._app.dispatch_async(event, payload, **self._dispatch_kwargs(kwargs))

    def dispatch_sync(
        self,
        event: Event | str,
        payload: Mapping[str, Any] | None = None,
        **kwargs: Unpack[DispatchOptions],
    ) -> str:
        """The blocking form of :meth:`dispatch`, for sync handlers running in the thread pool."""
        kwargs = self._dispatch_kwargs(kwargs)
        if self._outbox is not None:
            return self._outbox.dispatch(self.session, event, payload, app=self._app, **kwargs)
        loop = self._loop
        if loop is None or not loop.is_running():
            return self._app.dispatch(event, payload, **kwargs)
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "ctx.dispatch_sync() would block the event loop: await ctx.dispatch()"
            )
        coro = self._app.dispatch_async(event, payload, **kwargs)
        return asyncio.run_coroutine_threadsafe(coro, loop).result()


@dataclass(eq=False)
class Listener:
    """A registered handler with its bindings and policies."""

    app: ListenerApp
    handler: Handler
    patterns: tuple[str, ...]
    name: str
    queue: str
    retry: Retry
    timeout: float | None = DEFAULT_TIMEOUT
    concurrency: int | None = None
    idempotent: bool = True
    lease: float | None = None
    delivery_limit: int = 20
    max_body_bytes: int | None = None
    middleware: Sequence[AnyMiddleware] | None = None
    event_type: type[Event] | None = None
    wants_dict: bool = False
    takes_context: bool = True
    is_async: bool = True
    context_first: bool = False
    outbox: TransactionalOutbox | None = None
    fallback_handler: Fallback | None = field(default=None, repr=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.handler(*args, **kwargs)

    @property
    def claim_lease(self) -> float:
        """Seconds an idempotency claim lives unless renewed; it is renewed every third
        of it while the handler runs, so only a dead process's claim expires."""
        return self.lease if self.lease is not None else DEFAULT_LEASE

    def fallback(self, func: Fallback) -> Fallback:
        """Register ``func(event, ctx, error)`` to run once when retries are used up.

        It runs before the message is dead-lettered; if it raises, the error is
        logged and the dead letter still happens.
        """
        check_fallback(func)
        self.fallback_handler = func
        return func

    def resolve_type(self, event_name: str) -> type[Event] | None:
        """The class to validate a payload with: the bound type, else the registry."""
        if self.event_type is not None and self.event_type is not Event:
            return self.event_type
        from pigeon.events import lookup

        return lookup(event_name)


SHAPES = (
    "(event), (event, ctx) or (ctx: Context, event); annotate event with an Event "
    "subclass for a validated model or with dict for the raw payload"
)


def _is_context(annotation: Any) -> bool:
    if isinstance(annotation, str):  # an unresolved forward reference
        return annotation == "Context" or annotation.endswith(".Context")
    return isinstance(annotation, type) and issubclass(annotation, Context)


def inspect_handler(
    handler: Handler, targets: Sequence[type[Event] | str]
) -> tuple[type[Event] | None, bool, bool, bool, bool]:
    """Read the handler's signature: (event type, wants dict, takes context, is async,
    context first).

    Parameters are resolved by annotation where present (a ``Context`` one is
    the context, wherever it stands), else by position. What cannot be called
    with an event and a context is refused here, naming the handler and the
    accepted shapes, not at its first message.
    """
    if not callable(handler):
        raise ConfigurationError(f"listener handler {handler!r} is not callable")
    name = getattr(handler, "__qualname__", repr(handler))
    call = handler if inspect.isroutine(handler) else getattr(handler, "__call__", handler)  # noqa: B004
    # an object whose __call__ is async is awaited too: run in a thread, its coroutine never ran
    is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)
    if inspect.isasyncgenfunction(call) or inspect.isgeneratorfunction(call):
        raise ConfigurationError(
            f"listener {name} is a generator function: calling it runs nothing; "
            f"use a plain (async) def; accepted shapes: {SHAPES}"
        )
    parameters = inspect.signature(handler).parameters.values()
    params = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    keyword_only = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if keyword_only or not params or len(params) > 2:
        required = keyword_only and f"keyword-only parameter {', '.join(keyword_only)}"
        raise ConfigurationError(
            f"listener {name} cannot be called: it requires "
            f"{required or f'{len(params)} positional parameters'}; accepted shapes: {SHAPES}"
        )
    try:
        hints = typing.get_type_hints(handler)
    except Exception:  # unresolved forward references: use the raw annotations
        hints = {p.name: p.annotation for p in params}
    annotations = [hints.get(p.name, inspect.Parameter.empty) for p in params]
    contexts = [i for i, annotation in enumerate(annotations) if _is_context(annotation)]
    if len(contexts) == len(params) or len(contexts) > 1:
        raise ConfigurationError(
            f"listener {name} has no parameter left for the event: only one parameter may be "
            f"annotated Context; accepted shapes: {SHAPES}"
        )
    context_first = contexts == [0]
    annotation = annotations[1 if context_first else 0]
    typed = [t for t in targets if isinstance(t, type)]
    event_type: type[Event] | None = None
    wants_dict = False
    if isinstance(annotation, type) and issubclass(annotation, Event):
        event_type = annotation
    elif annotation is inspect.Parameter.empty and len(typed) == 1 and len(targets) == 1:
        event_type = typed[0]
    else:
        wants_dict = True
    return event_type, wants_dict, len(params) == 2, is_async, context_first


def check_fallback(func: Callable[..., Any]) -> None:
    """Refuse a fallback that cannot be called as ``func(event, ctx, error)``."""
    try:
        inspect.signature(func).bind(None, None, None)
    except TypeError as exc:
        name = getattr(func, "__qualname__", repr(func))
        raise ConfigurationError(
            f"fallback {name} cannot be called as (event, ctx, error): {exc}"
        ) from None
    except ValueError:  # no signature (a builtin): trust it
        pass


def default_listener_name(handler: Handler) -> str:
    """``send_confirmation`` → ``send-confirmation``: the listener part of a queue name."""
    inner = getattr(handler, "func", handler)  # functools.partial
    name = getattr(inner, "__name__", None) or type(handler).__name__
    return name.replace("_", "-")
