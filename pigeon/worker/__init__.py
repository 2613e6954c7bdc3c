"""``pigeon listen``: the worker that runs an app's listeners.

:class:`Worker` (in :mod:`pigeon.worker.loop`) consumes, hands each delivery
to the processor, settles the outcome (:mod:`pigeon.worker.settle`), reconnects
and drains; :mod:`pigeon.worker.idle` tells when it has nothing left to do.
"""

from pigeon.worker.loop import (
    CONSUMER_CHECK_INTERVAL,
    PREFETCH_PER_HANDLER,
    PURGE_INTERVAL,
    Worker,
    rss_mb,
)

__all__ = ["CONSUMER_CHECK_INTERVAL", "PREFETCH_PER_HANDLER", "PURGE_INTERVAL", "Worker", "rss_mb"]
