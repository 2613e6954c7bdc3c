"""Moved to :mod:`pigeon.core.pipeline`; this path keeps working for one release."""

from pigeon.core.pipeline import (
    Next,
    Wrapper,
    chain,
)

__all__ = [
    "Next",
    "Wrapper",
    "chain",
]
