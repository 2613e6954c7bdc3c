"""The sync bridge: ``dispatch`` for code that is not async.

The sync ``dispatch`` runs the async one on a background event-loop thread
owned by this process (a new one after ``fork()``), so it is safe from many
threads, Django/Flask views and forked workers. At interpreter exit it runs
the hooks registered with :func:`on_bridge_shutdown` (the app closes its
connections there), so it never imports the app.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from pigeon.logs import get_logger

__all__ = ["Bridge", "bridge", "on_bridge_shutdown"]

log = get_logger("pigeon")
T = TypeVar("T")


class Bridge:
    """A daemon thread running an event loop, so sync code can call async dispatch."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pigeon-dispatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the bridge loop and block until it is done."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("sync dispatch called from the dispatch thread itself")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, cleanup: Coroutine[Any, Any, None] | None = None, timeout: float = 5.0) -> None:
        if cleanup is not None:
            try:
                asyncio.run_coroutine_threadsafe(cleanup, self.loop).result(timeout)
            except Exception as exc:
                log.debug("dispatch.bridge_cleanup_failed", error=repr(exc))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


_bridge: Bridge | None = None
_bridge_lock = threading.Lock()
_shutdown_hooks: list[Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, None]]] = []


def on_bridge_shutdown(
    hook: Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, None]],
) -> None:
    """Run ``await hook(loop)`` on the bridge's loop when the interpreter exits.

    The app registers the closing of its connections here, so this module,
    below the app, never imports it.
    """
    if hook not in _shutdown_hooks:
        _shutdown_hooks.append(hook)


def _after_fork() -> None:
    global _bridge, _bridge_lock
    _bridge = None
    _bridge_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def bridge() -> Bridge:
    """This process's bridge, started on first use."""
    global _bridge
    current = _bridge
    if current is not None and current.pid == os.getpid():
        return current
    with _bridge_lock:
        if _bridge is None or _bridge.pid != os.getpid():
            _bridge = Bridge()
            atexit.register(_shutdown_bridge, _bridge)
        return _bridge


def _shutdown_bridge(b: Bridge) -> None:
    if b.pid != os.getpid():
        return
    b.stop(_run_shutdown_hooks(b.loop))


async def _run_shutdown_hooks(loop: asyncio.AbstractEventLoop) -> None:
    for hook in list(_shutdown_hooks):
        await hook(loop)
