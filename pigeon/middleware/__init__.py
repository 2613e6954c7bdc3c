"""Middleware: code that wraps every handler call (consume) or dispatch (publish).

The contracts are in :mod:`pigeon.middleware.base`; each built-in has its own
module (``logging``, ``timeout``, ``rate_limit``, ``overlap``, ``metrics``,
``tracing``). Import them from here: ``from pigeon.middleware import Timeout``.
"""

from pigeon.middleware.base import (
    CallNext,
    KeyFunc,
    Middleware,
    PublishMiddleware,
    PublishNext,
    chain,
    publish_chain,
)
from pigeon.middleware.logging import Logging
from pigeon.middleware.metrics import Metrics
from pigeon.middleware.overlap import WithoutOverlapping
from pigeon.middleware.rate_limit import RateLimit
from pigeon.middleware.timeout import Timeout

__all__ = [
    "CallNext",
    "KeyFunc",
    "Logging",
    "Metrics",
    "Middleware",
    "PublishMiddleware",
    "PublishNext",
    "RateLimit",
    "Timeout",
    "WithoutOverlapping",
    "chain",
    "publish_chain",
]
