"""OpenTelemetry tracing: a producer span per dispatch, a consumer span per handler call.

Why middleware: dispatch and handling already run through the middleware
chains, so tracing needs no hook of its own and can be removed, reordered or
configured like any other middleware. Every app gets :class:`Tracing` (consume,
outermost) and :class:`PublishTracing` (publish) by default when
``opentelemetry-api`` is importable (``pip install pigeon-bus[otel]``); without
it they are not installed, and an explicit instance does nothing but call
through (:data:`AVAILABLE` is ``False``).

What is guaranteed when it is on:

- a dispatch is a ``PRODUCER`` span ``publish {event}``, a child of whatever
  span is current, and its context travels in the W3C ``traceparent`` header
  (:data:`pigeon.headers.TRACEPARENT`, plus ``tracestate``/``baggage`` when the
  configured propagators write them);
- each handler call (each try) is a ``CONSUMER`` span ``process {event}``
  whose parent is the producer's context from the headers, so one trace spans
  every service; a message without ``traceparent`` starts a new trace;
- the consumer span is current while the handler runs: spans the handler
  starts, and ``ctx.dispatch``'s producer span, nest under it;
- a failing handler records the exception on the span with status ``ERROR``
  and ``error.type``; :class:`~pigeon.RetryLater` is a deliberate postponement,
  recorded as an event, not an error.

Attributes follow the messaging semantic conventions (``messaging.system``,
``messaging.destination.name`` = exchange, ``messaging.rabbitmq.destination.routing_key``,
``messaging.message.id``, ``messaging.message.conversation_id`` = correlation id,
``messaging.operation`` and its newer ``messaging.operation.type``/``.name``) plus
``pigeon.*`` ones (queue, listener, attempt, causation id, service). Without an
SDK the API's no-op tracer is used: nothing is recorded, an incoming
``traceparent`` is still passed on to the events a handler dispatches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any

from pigeon import headers as h
from pigeon.retry import RetryLater

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from pigeon.core.messages import Outgoing
    from pigeon.core.processor import Delivery
    from pigeon.middleware import CallNext, PublishNext

try:
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - the [otel] extra is not installed
    AVAILABLE = False
else:
    AVAILABLE = True

__all__ = [
    "AVAILABLE",
    "PublishTracing",
    "Tracing",
    "default_middleware",
    "default_publish_middleware",
]

SCOPE = "pigeon"
"""The instrumentation scope (tracer name) of every span Pigeon starts."""

try:
    _VERSION: str | None = metadata.version("pigeon-bus")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = None

Attributes = dict[str, str | int]

if AVAILABLE:

    class _HeaderGetter(Getter[Mapping[str, Any]]):
        """Reads trace context from AMQP headers, whose strings may arrive as bytes."""

        def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
            value = carrier.get(key)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            return [value] if isinstance(value, str) else None

        def keys(self, carrier: Mapping[str, Any]) -> list[str]:
            return [str(key) for key in carrier]

    _GETTER = _HeaderGetter()


def _tracer(provider: TracerProvider | None) -> Tracer | None:
    if not AVAILABLE:
        return None
    # Without a provider this is the API's proxy: it follows a global SDK provider
    # installed later, so apps may be created before tracing is configured.
    return trace.get_tracer(SCOPE, _VERSION, tracer_provider=provider)


def _configured(provider: TracerProvider | None) -> bool:
    """Whether spans can be recorded: an explicit provider, or a global SDK one.

    Without one, a message that carries no trace context costs no span at all;
    one that does still gets a non-recording span, so its context passes on.
    """
    if provider is not None:
        return True
    return not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


def _record_failure(span: Span, exc: BaseException) -> None:
    error_type = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        error_type = f"{module}.{error_type}"
    span.record_exception(exc)
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _observe_failure(span: Span, exc: BaseException) -> None:
    if isinstance(exc, RetryLater):
        span.add_event(
            "pigeon.retry_later",
            {"pigeon.retry.delay_seconds": float(exc.delay), "pigeon.reason": str(exc)},
        )
    elif not isinstance(exc, asyncio.CancelledError):
        _record_failure(span, exc)


class Tracing:
    """Consume middleware: one ``CONSUMER`` span per handler call, current while it runs.

    ``tracer_provider`` defaults to the global one (``trace.set_tracer_provider``).
    Put it first in ``middleware=[...]`` so the span covers the other middleware.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        self._tracer = _tracer(tracer_provider)

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        tracer = self._tracer
        if (
            tracer is None
            or not AVAILABLE
            or (h.TRACEPARENT not in delivery.headers and not _configured(self._provider))
        ):
            await call_next(delivery)
            return
        listener = delivery.listener
        context = delivery.context
        attributes: Attributes = {
            "messaging.system": "rabbitmq",
            "messaging.operation": "process",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": listener.app.settings.exchange,
            "messaging.rabbitmq.destination.routing_key": delivery.event_name,
            "messaging.message.id": delivery.message_id,
            "messaging.message.body.size": len(delivery.body),
            "pigeon.queue": listener.queue,
            "pigeon.listener": listener.name,
            "pigeon.attempt": context.attempt if context is not None else delivery.attempt,
        }
        if delivery.correlation_id:
            attributes["messaging.message.conversation_id"] = delivery.correlation_id
        if delivery.causation_id:
            attributes["pigeon.causation_id"] = delivery.causation_id
        if listener.app.service:
            attributes["pigeon.service"] = listener.app.service
        parent = propagate.extract(delivery.headers, getter=_GETTER)
        with tracer.start_as_current_span(
            f"process {delivery.event_name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await call_next(delivery)
            except BaseException as exc:
                _observe_failure(span, exc)
                raise


class PublishTracing:
    """Publish middleware: a ``PRODUCER`` span per dispatch, injected as ``traceparent``.

    The span lasts until the broker's confirm, so its duration is the dispatch's.
    An existing ``traceparent`` in ``headers=`` is replaced by this span's.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        self._tracer = _tracer(tracer_provider)

    async def __call__(self, outgoing: Outgoing, call_next: PublishNext) -> str:
        tracer = self._tracer
        if tracer is None or not AVAILABLE:
            return await call_next(outgoing)
        current = trace.get_current_span().get_span_context()
        if not current.is_valid and not _configured(self._provider):
            return await call_next(outgoing)
        attributes: Attributes = {
            "messaging.system": "rabbitmq",
            "messaging.operation": "publish",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": outgoing.exchange or "amq.default",
            "messaging.rabbitmq.destination.routing_key": outgoing.routing_key,
            "messaging.message.id": outgoing.message_id,
            "messaging.message.body.size": len(outgoing.body),
        }
        if outgoing.correlation_id:
            attributes["messaging.message.conversation_id"] = outgoing.correlation_id
        causation = outgoing.headers.get(h.CAUSATION_ID)
        if isinstance(causation, str):
            attributes["pigeon.causation_id"] = causation
        if outgoing.app_id:
            attributes["pigeon.service"] = outgoing.app_id
        with tracer.start_as_current_span(
            f"publish {outgoing.event_name}",
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            propagate.inject(outgoing.headers)
            try:
                return await call_next(outgoing)
            except BaseException as exc:
                _observe_failure(span, exc)
                raise


def default_middleware() -> list[Tracing]:
    """``[Tracing()]`` when OpenTelemetry is importable, else ``[]`` (an app's default)."""
    return [Tracing()] if AVAILABLE else []


def default_publish_middleware() -> list[PublishTracing]:
    """``[PublishTracing()]`` when OpenTelemetry is importable, else ``[]``."""
    return [PublishTracing()] if AVAILABLE else []
