"""Prometheus metrics and a health endpoint for ``pigeon listen --metrics-port``.

The metric names are public (dashboards and alerts are built on them):
``pigeon_messages_total{queue,event,outcome}``,
``pigeon_handler_duration_seconds{queue}``, ``pigeon_in_flight{queue}`` and
``pigeon_dispatched_total{event}``. ``/healthz`` answers 503 while the worker
has no broker connection, so an orchestrator can tell a stuck process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

MESSAGES = Counter(
    "pigeon_messages_total", "Messages handled, by outcome.", ["queue", "event", "outcome"]
)
HANDLER_SECONDS = Histogram(
    "pigeon_handler_duration_seconds", "Time from delivery to settled outcome.", ["queue"]
)
IN_FLIGHT = Gauge("pigeon_in_flight", "Messages being handled now.", ["queue"])
DISPATCHED = Counter("pigeon_dispatched_total", "Events confirmed by the broker.", ["event"])


def serve_metrics(
    port: int, ready: Callable[[], bool], host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/healthz`` on a daemon thread; returns the server.

    ``/healthz`` answers 200 while ``ready()`` is true (for ``pigeon listen``:
    ``worker.ready.is_set``, consuming on a live connection), else 503.
    ``ready`` is called on the server's thread, so it must only read.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, status, ctype = generate_latest(), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                healthy = ready()
                body = b"ok\n" if healthy else b"broker connection down\n"
                status, ctype = (200 if healthy else 503), "text/plain; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain; charset=utf-8"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="pigeon-metrics", daemon=True).start()
    return server
