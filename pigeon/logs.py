"""Structured logging: one event name per line, fields for everything else.

A library prints nothing on its own. Pigeon's loggers (:func:`get_logger`)
go through structlog when the application configured structlog, and
otherwise through the standard ``logging`` module under the ``pigeon``
logger, which has a ``NullHandler``: a program that configured neither sees
no Pigeon output at all, on stdout or stderr. ``configure_logging`` is
called by the CLIs (``pigeon listen``, ``letterthief``) and writes to
stderr: JSON when stderr is not a terminal (supervisor, containers),
readable colours when it is.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Literal, TextIO, cast

import structlog

logging.getLogger("pigeon").addHandler(logging.NullHandler())
logging.getLogger("letterthief").addHandler(logging.NullHandler())

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}

# Rendered as one "event key=value ..." line handed to the stdlib logger.
_STDLIB_PROCESSORS: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.format_exc_info,
    structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
]


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class LibraryLogger:
    """A structlog-style logger that never writes to stdout on its own.

    Each call looks at the configuration of that moment: structlog's, if the
    application (or a Pigeon CLI) configured it, else the stdlib logger
    ``name``, which is silent until ``logging`` is configured. Calls below the
    stdlib logger's level cost one check and render nothing.
    """

    __slots__ = ("_context", "_name", "_stdlib", "_structlog")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}
        # structlog's lazy proxies read the configuration of the moment on every call
        # (unless it says cache_logger_on_first_use), so each is built once.
        self._structlog: Any = None
        self._stdlib: Any = None

    def bind(self, **values: Any) -> LibraryLogger:
        return LibraryLogger(self._name, {**self._context, **values})

    def new(self, **values: Any) -> LibraryLogger:
        return LibraryLogger(self._name, dict(values))

    def __getattr__(self, method: str) -> Any:
        if structlog.is_configured():
            if self._structlog is None:
                self._structlog = structlog.get_logger(self._name, **self._context)
            return getattr(self._structlog, method)
        stdlib = logging.getLogger(self._name)
        level = _LEVELS.get(method)
        if level is not None and not stdlib.isEnabledFor(level):
            return _noop
        if self._stdlib is None:
            self._stdlib = structlog.wrap_logger(
                stdlib,
                processors=_STDLIB_PROCESSORS,
                wrapper_class=structlog.stdlib.BoundLogger,
                **self._context,
            )
        return getattr(self._stdlib, method)


def get_logger(name: str = "pigeon") -> structlog.typing.FilteringBoundLogger:
    """The logger Pigeon's modules use: see :class:`LibraryLogger`."""
    return cast(structlog.typing.FilteringBoundLogger, LibraryLogger(name))


class _Unbreakable:
    """stderr that shrugs off a closed pipe: when supervisor dies, the process must still
    stop cleanly on SIGTERM instead of failing on its first log line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


def configure_logging(fmt: Literal["console", "json"] = "json", level: str = "INFO") -> None:
    """Route structlog and the stdlib's ``logging`` (aio-pika, uvicorn) to stderr in ``fmt``."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, _Unbreakable(sys.stderr))),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,  # else: "<traceback object at …>"
                renderer,
            ],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
