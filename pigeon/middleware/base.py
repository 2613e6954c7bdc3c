"""The middleware contracts: code that wraps every handler call (consume) or dispatch (publish).

A consume middleware is ``async def __call__(self, delivery, call_next)``; it
runs around the handler, inside the retry decision, so an exception it raises
is a failure of that message like any handler error. Middleware listed first
is outermost. A middleware may decide the outcome without calling
``call_next`` (that is logged).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol

from pigeon.core import pipeline

if TYPE_CHECKING:
    from pigeon.core.messages import Outgoing
    from pigeon.core.processor import Delivery

CallNext = Callable[["Delivery"], Awaitable[None]]
PublishNext = Callable[["Outgoing"], Awaitable[str]]
KeyFunc = Callable[[Any], Hashable]
"""What :class:`~pigeon.middleware.RateLimit` and :class:`~pigeon.middleware.WithoutOverlapping`
key on: a function of the event."""


class Middleware(Protocol):
    """Wraps the handling of one delivery."""

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None: ...


class PublishMiddleware(Protocol):
    """Wraps the publishing of one outgoing event; returns the message id."""

    async def __call__(self, outgoing: Outgoing, call_next: PublishNext) -> str: ...


chain = pipeline.chain
"""Compose consume middleware around the handler call; the first in the list runs first."""

publish_chain = pipeline.chain
"""Compose publish middleware around the confirmed publish (the same chain)."""
