"""One way to wrap a call: the chain that consume and publish middleware both use.

A wrapper is ``async def __call__(self, item, call_next)``; it may act before
and after ``await call_next(item)``, replace the result, or not call it at
all. :func:`chain` composes wrappers around the innermost call once, so a
message pays one function call per wrapper and no list walk. This module
knows no message type: :mod:`pigeon.middleware` names the two it is used for
(``Delivery`` in, ``None`` out; ``Outgoing`` in, the message id out).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Next = Callable[[T], Awaitable[R]]
"""The rest of the chain: call it with the item, await its result."""


class Wrapper(Protocol[T, R]):
    """Wraps one call of a chain (positional parameters: any names will do)."""

    async def __call__(self, item: T, call_next: Callable[[T], Awaitable[R]], /) -> R: ...


def chain(wrappers: Sequence[Wrapper[T, R]], innermost: Next[T, R]) -> Next[T, R]:
    """Compose ``wrappers`` around ``innermost``; the first in the list runs first (outermost)."""
    call = innermost
    for wrapper in reversed(wrappers):
        call = _bind(wrapper, call)
    return call


def _bind(wrapper: Wrapper[T, R], call_next: Next[T, R]) -> Next[T, R]:
    async def step(item: T) -> R:
        return await wrapper(item, call_next)

    return step
