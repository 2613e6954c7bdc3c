"""``pigeon listen``: run an app's listeners until told to stop.

The whole lifecycle is in :class:`Worker`: connect (backing off while the
broker is down, never crash-looping), declare the topology, consume with one
channel per listener on one connection, settle each outcome on the broker,
rebuild everything after a lost connection, and on SIGTERM/SIGINT stop
consuming, let in-flight work finish up to ``shutdown_timeout`` and return 0.
``max_messages`` / ``max_memory`` end the run the same graceful way so a
supervisor can recycle the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
)

from pigeon.amqp import (
    RETRYABLE,
    Acker,
    Incoming,
    Subscription,
    backoff,
    declare,
    delivery_of,
    supervise,
)
from pigeon.app import Pigeon, Runtime
from pigeon.core.listener import Listener
from pigeon.core.processor import Delivery, NotStarted, Outcome, OutcomeKind, Processor
from pigeon.errors import ConfigurationError
from pigeon.idempotency import IdempotencyStore, open_store
from pigeon.logs import get_logger
from pigeon.metrics import MESSAGES
from pigeon.worker import idle
from pigeon.worker.settle import Settler
from pigeon.worker.threads import HandlerThreads

log = get_logger("pigeon")

PURGE_INTERVAL = 3600.0
CONSUMER_CHECK_INTERVAL = 0.2
PREFETCH_PER_HANDLER = 10
"""Default prefetch per unit of concurrency: a batch for the store's group commit and the
acks to fill while the handlers run (see ``docs/performance.md``)."""
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 1048576
    except OSError:
        return 0.0


class _Slots:
    """A listener's handler limit (``--concurrency``) that admits no handler once the
    worker is stopping: what was prefetched but not started goes back to the queue."""

    __slots__ = ("_semaphore", "_stopping")

    def __init__(self, concurrency: int, stopping: asyncio.Event) -> None:
        self._semaphore = asyncio.Semaphore(concurrency)
        self._stopping = stopping

    async def __aenter__(self) -> None:
        if not self._stopping.is_set():
            await self._semaphore.acquire()
            if not self._stopping.is_set():
                return
            self._semaphore.release()
        raise NotStarted("the worker is stopping")

    async def __aexit__(self, *_: object) -> None:
        self._semaphore.release()


class _SlowStart:
    """Prefetch one message at a time until a delivery is not a redelivery.

    After a crash the broker hands the dead worker's unacked messages back and
    counts one more delivery against each. If one of them kills the process
    again, every message prefetched beside it is counted again too, so a crash
    loop would carry up to ``prefetch`` innocent messages to the queue's
    ``x-delivery-limit`` with it. A consumer therefore subscribes with a
    prefetch of one; the first delivery that is not a redelivery (the returned
    backlog is worked through, or there was none) calls ``raise_prefetch``,
    which subscribes again with the full prefetch. A poison message at the
    head of the queue then crashes alone.
    """

    __slots__ = ("_raising", "prefetch", "raise_prefetch")

    def __init__(self, prefetch: int) -> None:
        self.prefetch = prefetch
        self.raise_prefetch: Callable[[], Awaitable[None]] | None = None
        self._raising: asyncio.Future[None] | None = None

    @property
    def initial(self) -> int:
        """The prefetch to subscribe with."""
        return min(self.prefetch, 1)

    def seen(self, message: Incoming) -> None:
        if self._raising is None and not message.redelivered and self.raise_prefetch is not None:
            self._raising = asyncio.ensure_future(self.raise_prefetch())


def _quiet_connection_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """aiormq leaves a failed future behind on every lost connection; that loss is already
    logged (``broker.connection_lost``), so its echo is demoted to debug."""
    if isinstance(context.get("exception"), RETRYABLE):
        log.debug("broker.background_error", error=repr(context["exception"]))
        return
    loop.default_exception_handler(context)


async def _start_relays(app: Pigeon, listeners: Sequence[Listener]) -> Any:
    """Relay the outboxes these listeners dispatch into (none: nothing is imported)."""
    if all(listener.outbox is None for listener in listeners):
        return None
    from pigeon.outbox.guard import check_tables
    from pigeon.outbox.relay import RelayGroup

    outboxes = [lst.outbox for lst in listeners if lst.outbox is not None]
    await check_tables(outboxes)  # a missing table refuses to start (ConfigurationError)
    return RelayGroup.start(app, outboxes)


class Worker:
    """Consumes an app's listeners on one connection until stopped.

    ``await worker.run()`` returns the exit code (0 after a graceful stop).
    Pass ``handle_signals=False`` to embed it; call :meth:`stop` to end it.

    ``freeze_heap=True`` (what ``pigeon listen`` passes: the process is the
    listener's own) collects once at start-up and then moves every object
    alive to the garbage collector's permanent generation (:func:`gc.freeze`).
    The app, its imports and the connection live as long as the process; left
    in the collector's oldest generation, each full pass walks them all, about
    12 ms for a typical listener, and every delivery waits meanwhile.
    """

    def __init__(
        self,
        app: Pigeon,
        *,
        listeners: Sequence[str] = (),
        concurrency: int = 10,
        prefetch: int | None = None,
        shutdown_timeout: float = 30.0,
        max_messages: int | None = None,
        max_memory: float | None = None,
        idempotency_url: str | None = None,
        handle_signals: bool = True,
        store: IdempotencyStore | None = None,
        freeze_heap: bool = False,
    ) -> None:
        self.app = app
        self.freeze_heap = freeze_heap
        self.listeners: list[Listener] = app.find_listeners(listeners)
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.shutdown_timeout = shutdown_timeout
        self.max_messages = max_messages
        self.max_memory = max_memory
        self.handle_signals = handle_signals
        self._store_url = idempotency_url or app.settings.idempotency_url
        self.store = store
        self.counts: Counter[str] = Counter()
        self.started = 0
        self.ready = asyncio.Event()
        self.stop_reason: str | None = None
        self._stopping = asyncio.Event()
        self._refusing = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumers: list[Subscription] = []
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._settler: Settler | None = None
        self._processors: dict[str, Processor] = {}
        self._executor: HandlerThreads | None = None
        self._runtime: Runtime | None = None
        self._purging: asyncio.Future[None] | None = None
        self._relays: Any = None

    @property
    def connections(self) -> int:
        """How many connections this worker has opened (1 + reconnects)."""
        return self._runtime.connector.generation if self._runtime is not None else 0

    # -- lifecycle -----------------------------------------------------------------

    def stop(self, reason: str = "requested") -> None:
        """Ask the worker to stop consuming and drain; safe to call more than once.

        Prefetched messages whose handler has not started go back to the queue,
        except when the stop is ``max-messages``: the N messages it counted run.
        """
        if reason != "max-messages":
            self._refusing.set()
        if not self._stopping.is_set():
            self.stop_reason = reason
            self._stopping.set()  # before logging: a broken stderr must not keep us running
            with contextlib.suppress(Exception):
                log.info("worker.stopping", reason=reason, in_flight=len(self._tasks))

    async def join(self, timeout: float | None = None) -> None:
        """Wait until the worker is idle, like dramatiq's ``join()``; for tests and scripts.

        Idle: consuming, no handler running, every ack written, and nothing
        ready for it on the broker, in its queues or their retry tiers (a
        message waiting out a retry delay is waited for). After ``join()``
        nothing more happens until something new is dispatched, so a test can
        assert that a message was handled exactly so often. Raises
        ``TimeoutError`` after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        quiet_since: float | None = None
        quiet_started = self.started
        async with asyncio.timeout(timeout):
            while True:
                await self.ready.wait()
                if self._tasks:
                    quiet_since = None
                    await asyncio.wait(set(self._tasks))
                    continue
                started, settler, runtime = self.started, self._settler, self._runtime
                if any(c.acker.unsettled for c in self._consumers) or not (settler and runtime):
                    await asyncio.sleep(idle.POLL)  # the acks leave at the end of the turn
                    continue
                with contextlib.suppress(*RETRYABLE):  # a lost connection: ask again
                    waiting = await idle.ready_messages(
                        [(c.channel, c.queue) for c in self._consumers],
                        settler.tiers,
                        await runtime.connector.get(),
                    )
                    if waiting or self.started != started or self._tasks:
                        quiet_since = None
                    elif quiet_since is None or started != quiet_started:
                        quiet_since, quiet_started = loop.time(), started
                    elif loop.time() - quiet_since >= idle.QUIET:
                        return
                await asyncio.sleep(idle.POLL)

    async def run(self) -> int:
        """Consume until stopped; returns the process exit code."""
        if not self.listeners:
            log.error("worker.no_listeners", app=repr(self.app))
            return 1
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
        loop.set_exception_handler(_quiet_connection_errors)
        self._runtime = self.app.runtime()
        try:
            await self._open_store()
            self._purging = asyncio.ensure_future(self._purge_periodically())
            self._build_processors()
            self._relays = await _start_relays(self.app, self.listeners)
            if self.freeze_heap:
                gc.collect()
                gc.freeze()
                log.info("worker.heap_frozen", objects=gc.get_freeze_count())
            await self._consume_until_stopped()
        finally:
            await self._drain()
            if self.handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        log.info("worker.stopped", reason=self.stop_reason, **self.counts)
        return 0

    async def _consume_until_stopped(self) -> None:
        """Connect, consume, and after a lost connection do it all again."""
        assert self._runtime is not None
        await supervise(
            self._runtime.connector,
            self._stopping,
            name="worker",
            connecting=lambda: self._retrying(RETRYABLE, "broker.unreachable"),
            gives_up_on=RETRYABLE,
            start=self._start_consuming,
            consuming=self._consuming,
            until_lost=self._wait_for_stop_or_disconnect,
        )

    def _consuming(self) -> None:
        self.ready.set()
        log.info(
            "worker.consuming",
            listeners=[listener.queue for listener in self.listeners],
            pid=os.getpid(),
        )

    async def _open_store(self) -> None:
        if self.store is None and any(
            listener.idempotent and listener.outbox is None for listener in self.listeners
        ):
            self.store = open_store(
                self._store_url, retention=self.app.settings.idempotency_retention
            )
        if self.store is not None:
            async for attempt in self._retrying(Exception, "idempotency.store_unavailable"):
                with attempt:
                    await self.store.open()

    async def _purge_periodically(self) -> None:
        """Bound the idempotency store: forget handled ids older than the retention."""
        while self.store is not None:
            try:
                purged = await self.store.purge()
                if purged:
                    log.info("idempotency.purged", count=purged)
            except Exception as exc:
                log.warning("idempotency.purge_failed", error=repr(exc))
            await asyncio.sleep(PURGE_INTERVAL)

    def _build_processors(self) -> None:
        if any(not listener.is_async for listener in self.listeners):
            workers = sum(listener.concurrency or self.concurrency for listener in self.listeners)
            self._executor = HandlerThreads(
                max_workers=workers, thread_name_prefix="pigeon-handler"
            )
        for listener in self.listeners:
            self._processors[listener.queue] = Processor(
                listener,
                store=self.store,
                executor=self._executor,
                max_body_bytes=self.app.settings.max_body_bytes,
            )

    def _retrying(self, errors: Any, event: str) -> AsyncRetrying:
        def before_sleep(state: RetryCallState) -> None:
            log.warning(
                event,
                attempt=state.attempt_number,
                retry_in=round(state.upcoming_sleep, 2),
                error=repr(state.outcome.exception()) if state.outcome else None,
                url=self.app.settings.url and self._runtime and self._runtime.connector.masked_url,
            )

        # a configuration error (a refused store or broker login) is never retried
        retry = retry_if_exception_type(errors) & retry_if_not_exception_type(ConfigurationError)
        return backoff(retry, self._stopping, before_sleep)

    async def _start_consuming(self) -> None:
        assert self._runtime is not None
        connector = self._runtime.connector
        connection = await connector.get()
        await declare(connection, self.app.topology(self.listeners))
        if self._settler is None or self._settler.generation != connector.generation:
            self._settler = Settler(self.app, self._runtime, self.listeners)
        self._consumers.clear()
        for listener in self.listeners:
            concurrency = listener.concurrency or self.concurrency
            prefetch = max(self.prefetch or concurrency * PREFETCH_PER_HANDLER, 1)
            if self.max_messages is not None:
                prefetch = min(prefetch, self.max_messages)
            slow = _SlowStart(prefetch)
            consumer = await Subscription.open(connection, listener.queue, prefetch=slow.initial)
            processor = self._processors[listener.queue]
            semaphore = _Slots(concurrency, self._refusing)
            await consumer.consume(
                functools.partial(self._spawn, processor, semaphore, consumer.acker, slow)
            )
            self._consumers.append(consumer)
            if prefetch > slow.initial:
                slow.raise_prefetch = functools.partial(self._raise_prefetch, consumer, prefetch)

    async def _wait_for_stop_or_disconnect(self) -> None:
        """Return when asked to stop, when the connection is lost, or when a consumer is gone.

        RabbitMQ can cancel a consumer on its own (a queue deleted or moved, a
        node reset) and aiormq forgets such a consumer without a word; the
        watchdog notices within :data:`CONSUMER_CHECK_INTERVAL` and subscribes
        again on the same channel, the others untouched; only if that fails
        does the worker reconnect.
        """
        assert self._runtime is not None
        closed = asyncio.ensure_future(self._runtime.connector.closed.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        watchdog = asyncio.ensure_future(self._watch_consumers())
        await asyncio.wait({closed, stopping, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (closed, stopping, watchdog):
            fut.cancel()
        if not self._stopping.is_set():
            log.warning("worker.reconnecting", in_flight=len(self._tasks))
            self._runtime.connector.invalidate()
        self.ready.clear()

    async def _watch_consumers(self) -> None:
        while True:
            await asyncio.sleep(CONSUMER_CHECK_INTERVAL)
            for consumer in self._consumers:
                if consumer.closed:
                    log.warning("worker.channel_closed", queue=consumer.queue)
                    return
                if consumer.cancelled:
                    log.warning("worker.consumer_cancelled_by_broker", queue=consumer.queue)
                    if not await self._resubscribe(consumer):
                        return

    async def _raise_prefetch(self, consumer: Subscription, prefetch: int) -> None:
        """Subscribe ``consumer``'s queue again with ``prefetch`` (see
        :meth:`Subscription.raise_prefetch`)."""
        if consumer not in self._consumers or consumer.closed:
            return  # reconnected meanwhile: the new subscription starts slow again
        try:
            await consumer.raise_prefetch(prefetch)
        except Exception as exc:  # the channel closed: the worker reconnects anyway
            log.debug("worker.prefetch_not_raised", queue=consumer.queue, error=repr(exc))

    async def _resubscribe(self, consumer: Subscription) -> bool:
        """Consume ``consumer``'s queue again on its channel; False if that failed."""
        try:
            await consumer.resubscribe()
        except Exception as exc:
            log.warning("worker.resubscribe_failed", queue=consumer.queue, error=repr(exc))
            return False
        log.info("worker.resubscribed", queue=consumer.queue)
        return True

    async def _drain(self) -> None:
        if self._purging is not None:
            self._purging.cancel()
        for consumer in self._consumers:
            try:
                await consumer.cancel()
            except Exception as exc:
                log.debug("worker.cancel_failed", queue=consumer.queue, error=repr(exc))
        if self._tasks:
            log.info("worker.draining", in_flight=len(self._tasks), timeout=self.shutdown_timeout)
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("worker.abandoned", count=len(pending), note="they will be redelivered")
                await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(consumer.close() for consumer in self._consumers))
        self._consumers.clear()
        if self._relays is not None:
            await self._relays.stop()
        if self._runtime is not None:
            await self.app.close_runtime(self._runtime)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            await self.store.close()

    # -- one message ---------------------------------------------------------------

    def _spawn(
        self,
        processor: Processor,
        semaphore: _Slots,
        acker: Acker,
        slow: _SlowStart,
        message: Incoming,
    ) -> None:
        tag = message.delivery_tag
        assert tag is not None, "a consumed message always has a delivery tag"
        acker.delivered(tag)
        slow.seen(message)
        if self._stopping.is_set() or (
            self.max_messages is not None and self.started >= self.max_messages
        ):
            acker.give_back(tag)
            return
        self.started += 1
        if self.max_messages is not None and self.started >= self.max_messages:
            self.stop("max-messages")
        task = asyncio.ensure_future(self._handle(processor, semaphore, acker, tag, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(
        self,
        processor: Processor,
        semaphore: _Slots,
        acker: Acker,
        tag: int,
        message: Incoming,
    ) -> None:
        started = time.perf_counter()
        delivery = delivery_of(processor.listener, message)
        try:
            outcome = await processor.process(delivery, semaphore)  # the handler under the limit
        except NotStarted:
            acker.give_back(tag)
            return
        assert self._settler is not None
        settled = await self._settler.settle(acker, tag, delivery, outcome)
        self._record(delivery, outcome, settled, time.perf_counter() - started)

    def _record(self, delivery: Delivery, outcome: Outcome, settled: bool, seconds: float) -> None:
        self.counts[outcome.kind.value] += 1
        queue = delivery.listener.queue
        labels = (queue, delivery.event_name, outcome.kind.value)
        counter = self._counters.get(labels)
        if counter is None:
            counter = self._counters[labels] = MESSAGES.labels(*labels)
        counter.inc()
        fields: dict[str, Any] = {
            "queue": delivery.listener.queue,
            "event_name": delivery.event_name,
            "message_id": delivery.message_id,
            "correlation_id": delivery.correlation_id,
            "causation_id": delivery.causation_id,
            "attempt": delivery.context.attempt if delivery.context else delivery.attempt,
            "outcome": outcome.kind.value,
            "duration_ms": round(seconds * 1000, 2),
        }
        if not settled:
            fields["settled"] = False
        if outcome.kind is OutcomeKind.RETRIED:
            fields["next_attempt"] = outcome.attempt
            log.warning("message.handled", delay=outcome.delay, error=repr(outcome.error), **fields)
        elif outcome.kind is OutcomeKind.DEAD_LETTERED:
            log.error("message.handled", reason=outcome.reason, error=repr(outcome.error), **fields)
        else:
            log.info("message.handled", **fields)
        if (
            self.max_memory is not None
            and sum(self.counts.values()) % 50 == 0
            and rss_mb() > self.max_memory
        ):
            self.stop("max-memory")
