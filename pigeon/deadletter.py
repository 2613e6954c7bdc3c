"""What a dead letter carries, so a person can tell what failed without a debugger.

The ``x-pigeon-*`` headers are part of the wire format; LetterThief and any
other tool read them. Values are bounded so the headers always fit in one
AMQP frame (RabbitMQ's default ``frame_max`` is 128 KiB).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pigeon import headers as h

MAX_TRACEBACK = 8_000
MAX_EXCEPTION_MESSAGE = 2_000


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _head(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_exception(error: BaseException | None) -> tuple[str, str, str]:
    """(qualified type, message, traceback) of ``error``, each bounded."""
    if error is None:
        return "", "", ""
    kind = type(error)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    tb = "".join(traceback.format_exception(error))
    return name, _head(str(error), MAX_EXCEPTION_MESSAGE), _tail(tb, MAX_TRACEBACK)


def dead_letter_headers(
    original: Mapping[str, Any],
    *,
    reason: str,
    error: BaseException | None,
    queue: str,
    listener: str,
    attempts: int,
    service: str | None,
) -> dict[str, Any]:
    """The original headers plus the failure description of the contract."""
    exc_type, exc_message, tb = describe_exception(error)
    out = {k: v for k, v in original.items() if k != h.ATTEMPT}
    out.update(
        {
            h.REASON: reason,
            h.EXCEPTION_TYPE: exc_type,
            h.EXCEPTION_MESSAGE: exc_message,
            h.TRACEBACK: tb,
            h.QUEUE: queue,
            h.LISTENER: listener,
            h.ATTEMPTS: attempts,
            h.FAILED_AT: datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
    )
    if service:
        out[h.SERVICE] = service
    return out
