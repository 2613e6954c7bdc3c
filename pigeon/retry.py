"""Retry policy and the two exceptions a handler raises to steer its message.

A failed try is retried in-process (``immediate``), then through TTL tier
queues ``{queue}.retry.{delay}`` that dead-letter back into the listener's
queue, so a delay costs the broker one queue per distinct delay and never
blocks the listener. When ``attempts`` is used up, the fallback runs and the
message goes to the dead-letter exchange.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pigeon.errors import ConfigurationError, PigeonError


class RetryLater(PigeonError):
    """Raise from a handler to try the message again after ``delay`` seconds.

    By default it counts as an attempt, so a message cannot be postponed
    forever; when the attempts are used up it ends in the dead letters like
    any failure. ``counts=False`` (used by :class:`pigeon.middleware.RateLimit`)
    postpones without spending an attempt. Delays outside the listener's
    policy are rounded up to :data:`DELAY_LADDER`, so they share a bounded set
    of tier queues.
    """

    def __init__(self, delay: float, reason: str = "", *, counts: bool = True) -> None:
        if delay <= 0:
            raise ValueError("RetryLater delay must be positive seconds")
        super().__init__(reason or f"retry requested in {delay:g}s")
        self.delay = delay
        self.reason = reason
        self.counts = counts


class Reject(PigeonError):
    """Raise from a handler to send the message straight to the dead letters.

    Use it for messages that no retry can fix; ``reason`` is stored in
    ``x-pigeon-exception-message`` for the person reading LetterThief.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Retry:
    """How often and how late a failing message is tried again.

    ``attempts`` counts every try, the first included. The first ``immediate``
    retries run in-process right away; each later one waits the next entry of
    ``delays`` (seconds; the last entry repeats).
    """

    attempts: int = 5
    delays: Sequence[float] = field(default=(1.0, 10.0, 60.0, 300.0))
    immediate: int = 0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError("Retry(attempts=...) counts the first try: use 1 or more")
        if self.immediate < 0:
            raise ConfigurationError("Retry(immediate=...) must be 0 or more")
        if not self.delays or any(d <= 0 for d in self.delays):
            raise ConfigurationError("Retry(delays=...) needs one or more positive delays")
        object.__setattr__(self, "delays", tuple(float(d) for d in self.delays))

    def next_delay(self, failed_attempt: int) -> float | None:
        """Seconds to wait before the try after ``failed_attempt`` (1-based).

        ``0.0`` means retry in-process now; ``None`` means attempts are used up.
        """
        if failed_attempt >= self.attempts:
            return None
        if failed_attempt <= self.immediate:
            return 0.0
        index = min(failed_attempt - self.immediate - 1, len(self.delays) - 1)
        return self.delays[index]

    def tier_delays(self) -> tuple[float, ...]:
        """Every delay this policy can ask for, i.e. the tier queues it needs."""
        delays = {self.next_delay(n) for n in range(1, self.attempts)}
        return tuple(sorted(d for d in delays if d))


DELAY_LADDER = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def tier_delay(delay: float, policy: Retry) -> float:
    """The delay a message really waits: ``delay`` if the policy has that tier, else the
    next rung of :data:`DELAY_LADDER` (the last rung for anything longer)."""
    if delay in policy.tier_delays():
        return delay
    return next((rung for rung in DELAY_LADDER if rung >= delay), DELAY_LADDER[-1])


def tier_label(delay: float) -> str:
    """``5s`` for whole seconds, ``250ms`` otherwise: the suffix of a tier queue's name."""
    millis = round(delay * 1000)
    if millis <= 0:
        raise ValueError("a retry tier needs a positive delay")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def tier_queue(queue: str, delay: float) -> str:
    """The name of the TTL tier queue that holds ``queue``'s messages for ``delay`` seconds."""
    return f"{queue}.retry.{tier_label(delay)}"
