"""Settings read from the environment (``PIGEON_*``), and URL masking.

Every broker URL that reaches a log line or an error message goes through
:func:`mask_url` first, so passwords never leave the process.
"""

from __future__ import annotations

import sys
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pigeon.errors import SettingsError


def _default_log_format() -> Literal["console", "json"]:
    return "console" if sys.stderr.isatty() else "json"


class Settings(BaseSettings):
    """Pigeon's configuration; each field is the environment variable ``PIGEON_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="PIGEON_", extra="ignore")

    url: str = "amqp://guest:guest@localhost:5672/"
    url_shuffle: bool = True
    quorum_size: int | None = Field(default=None, ge=1)
    service: str | None = None
    exchange: str = "pigeon.events"
    dead_letter_exchange: str = "pigeon.dead"
    dead_letter_queue: str = "pigeon.dead-letters"
    unrouted_exchange: str = "pigeon.unrouted"
    unrouted_queue: str = "pigeon.unrouted"
    unrouted_max_length: int = Field(default=100_000, ge=1)
    idempotency_url: str = "sqlite:///.pigeon/idempotency.db"
    idempotency_retention: float = Field(default=7 * 24 * 3600, gt=0)
    dispatch_timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    log_format: Literal["console", "json"] = Field(default_factory=_default_log_format)
    log_level: str = "INFO"

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise settings_error(exc, self.model_config.get("env_prefix", "")) from None

    @field_validator("url")
    @classmethod
    def _amqp_urls(cls, value: str) -> str:
        for item in value.split(","):
            scheme = urlsplit(item.strip()).scheme
            if scheme not in ("amqp", "amqps"):
                raise ValueError(
                    f"{mask_url(item.strip())!r} is not an AMQP URL: use "
                    "amqp://user:password@host:5672/vhost (or amqps:// for TLS), "
                    "several separated by commas"
                )
        return value

    @field_validator(
        "exchange",
        "dead_letter_exchange",
        "dead_letter_queue",
        "unrouted_exchange",
        "unrouted_queue",
    )
    @classmethod
    def _broker_name(cls, value: str) -> str:
        """A name RabbitMQ refuses is a setting error, not an outage retried until a timeout."""
        if not value:
            raise ValueError("use a name (the default exchange cannot be declared or bound)")
        if value.startswith("amq."):
            raise ValueError("names starting with 'amq.' are reserved by RabbitMQ")
        if len(value.encode()) > 255:
            raise ValueError("use a name of at most 255 bytes")
        return value

    @field_validator("idempotency_url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        """An unknown store is refused here, in one line, not as a traceback at listen."""
        scheme, sep, rest = value.partition("://")
        known = ("memory", "sqlite", "redis", "rediss", "postgresql", "postgres")
        if not sep or scheme.lower() not in (*known, "postgresql+asyncpg"):
            raise ValueError(f"use one of {IDEMPOTENCY_SCHEMES}")
        if scheme.lower() == "sqlite" and (not rest.startswith("/") or rest == "/"):
            raise ValueError("use sqlite:///relative/path.db or sqlite:////absolute/path.db")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in _LEVELS:
            raise ValueError(f"use one of {', '.join(_LEVELS)}")
        return value.upper()


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
IDEMPOTENCY_SCHEMES = "memory://, sqlite:///path, redis://, rediss://, postgresql://, postgres://"


def settings_error(exc: ValidationError, prefix: str) -> SettingsError:
    """One line naming the environment variable and what it accepts, from pydantic's error."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        given = error.get("input")
        message = str(error["msg"]).removeprefix("Value error, ")
        masked = (
            ",".join(mask_url(item) for item in given.split(",")) if isinstance(given, str) else ""
        )
        shown = f"={masked!r}" if isinstance(given, str) else ""
        problems.append(f"{prefix}{field.upper()}{shown} is invalid: {message}")
    return SettingsError("; ".join(problems))


def broker_urls(url: str) -> list[str]:
    """The node URLs of ``PIGEON_URL``: one URL, or several separated by commas (a cluster)."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError("PIGEON_URL is empty: give amqp://user:password@host:5672/vhost")
    return urls


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***`` (user and host stay readable).

    A comma-separated list of node URLs is masked node by node.
    """
    if "," in url:
        return ",".join(mask_url(part.strip()) for part in url.split(",") if part.strip())
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
