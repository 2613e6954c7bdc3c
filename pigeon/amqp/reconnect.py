"""One reconnect loop: connect (backing off), start consuming, run until the connection is
lost, and again, until stopped. The worker and LetterThief's collector both run it.

What differs between them is passed in: which errors a later try may cure
(the worker never retries a :class:`~pigeon.errors.ConfigurationError`; the
collector keeps trying a refused login so a fixed permission is picked up
without a restart), how to start consuming, and what to do when the
connection is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, wait_exponential_jitter

from pigeon.amqp.connection import Connector
from pigeon.amqp.publisher import RETRYABLE
from pigeon.logs import get_logger

__all__ = ["backoff", "supervise"]

log = get_logger("pigeon")


def backoff(
    retry: Any, stopping: asyncio.Event, before_sleep: Callable[[RetryCallState], None]
) -> AsyncRetrying:
    """Try while ``retry`` (a tenacity predicate) holds: exponential backoff with jitter,
    0.5 s doubling up to 30 s. Setting ``stopping`` ends the wait at once and the tries
    after it; the last error is raised again."""

    async def sleep(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)

    return AsyncRetrying(
        retry=retry,
        wait=wait_exponential_jitter(multiplier=0.5, max=30.0, jitter=1.0),
        stop=lambda _: stopping.is_set(),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


async def supervise(
    connector: Connector,
    stopping: asyncio.Event,
    *,
    name: str,
    connecting: Callable[[], AsyncRetrying],
    gives_up_on: tuple[type[BaseException], ...],
    start: Callable[[], Awaitable[None]],
    consuming: Callable[[], None],
    until_lost: Callable[[], Awaitable[None]],
) -> None:
    """Run ``start`` on every new connection of ``connector`` until ``stopping`` is set.

    ``connecting()`` is the backoff for reaching the broker (see :func:`backoff`);
    when it ends on one of ``gives_up_on`` (it was stopped meanwhile), this
    returns. ``start`` subscribes; an error of :data:`RETRYABLE` there (the
    connection died under it) is logged as ``<name>.start_failed`` and the
    loop connects again. Then ``consuming()`` says it is running and
    ``until_lost()`` returns when the connection (or a consumer) is lost, or
    when stopped.
    """
    while not stopping.is_set():
        if not await _connect(connector, stopping, connecting(), gives_up_on):
            return
        try:
            await start()
        except RETRYABLE as exc:
            log.warning(f"{name}.start_failed", error=repr(exc))
            connector.invalidate()
            continue
        consuming()
        await until_lost()


async def _connect(
    connector: Connector,
    stopping: asyncio.Event,
    connecting: AsyncRetrying,
    gives_up_on: tuple[type[BaseException], ...],
) -> bool:
    """Connect, backing off while the broker is away; False when stopped meanwhile."""
    try:
        async for attempt in connecting:
            with attempt:
                await connector.get(timeout=10)
    except gives_up_on:
        return False
    return not stopping.is_set()
