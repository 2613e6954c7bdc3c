"""The thread pool sync handlers run in: daemon threads, so a stop is never held hostage.

:class:`concurrent.futures.ThreadPoolExecutor` joins its threads when the
interpreter exits, so a sync handler still sleeping after ``pigeon listen``'s
``--shutdown-timeout`` kept the process alive until it returned. These
threads are daemons and nobody joins them: once the drain gives up, the
process exits; the handler's message was not acked, so the broker redelivers
it, as documented. A handler that returns before the exit is settled as usual.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class HandlerThreads(Executor):
    """At most ``max_workers`` daemon threads, started as work arrives."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "pigeon-handler") -> None:
        self.max_workers = max(max_workers, 1)
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot run a handler after the worker shut down")
            self._queue.put((future, fn, args, kwargs))
            if self._queue.qsize() > self._idle and len(self._threads) < self.max_workers:
                thread = threading.Thread(
                    target=self._work,
                    name=f"{self._prefix}_{len(self._threads)}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            item = self._queue.get()
            with self._lock:
                self._idle -= 1
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
            del item, future, fn, args, kwargs

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; threads end when idle. ``wait`` joins only idle ones."""
        with self._lock:
            self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
