"""Middleware: code that wraps every handler call (consume) or dispatch (publish).

A consume middleware is ``async def __call__(self, delivery, call_next)``; it
runs around the handler, inside the retry decision, so an exception it raises
is a failure of that message like any handler error. Middleware listed first
is outermost. A middleware may decide the outcome without calling
``call_next`` (that is logged).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pigeon.delivery import Delivery
    from pigeon.dispatch import Outgoing

CallNext = Callable[["Delivery"], Awaitable[None]]
PublishNext = Callable[["Outgoing"], Awaitable[str]]


class Middleware(Protocol):
    """Wraps the handling of one delivery."""

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None: ...


class PublishMiddleware(Protocol):
    """Wraps the publishing of one outgoing event; returns the message id."""

    async def __call__(self, outgoing: Outgoing, call_next: PublishNext) -> str: ...


def chain(middleware: Sequence[Middleware], innermost: CallNext) -> CallNext:
    """Compose ``middleware`` around ``innermost``; the first in the list runs first."""
    call = innermost
    for mw in reversed(middleware):
        call = _bind(mw, call)
    return call


def _bind(mw: Middleware, call_next: CallNext) -> CallNext:
    async def step(delivery: Delivery) -> None:
        await mw(delivery, call_next)

    return step


def publish_chain(middleware: Sequence[PublishMiddleware], innermost: PublishNext) -> PublishNext:
    """Compose publish middleware around the confirmed publish."""
    call = innermost
    for mw in reversed(middleware):
        call = _bind_publish(mw, call)
    return call


def _bind_publish(mw: PublishMiddleware, call_next: PublishNext) -> PublishNext:
    async def step(outgoing: Outgoing) -> str:
        return await mw(outgoing, call_next)

    return step
