"""Moved to :mod:`pigeon.middleware.tracing`; this path keeps working for one release."""

from pigeon.middleware.tracing import (
    AVAILABLE,
    SCOPE,
    Attributes,
    PublishTracing,
    Tracing,
    default_middleware,
    default_publish_middleware,
)

__all__ = [
    "AVAILABLE",
    "SCOPE",
    "Attributes",
    "PublishTracing",
    "Tracing",
    "default_middleware",
    "default_publish_middleware",
]
