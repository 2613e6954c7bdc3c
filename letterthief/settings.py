"""LetterThief's configuration: ``LETTERTHIEF_*`` variables, plus pigeon's ``PIGEON_*``.

The exchange and queue names LetterThief reads come from :class:`pigeon.Settings`
so it always agrees with the services it watches.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from pigeon.settings import settings_error


class LetterThiefSettings(BaseSettings):
    """Each field is the environment variable ``LETTERTHIEF_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="LETTERTHIEF_", extra="ignore")

    database_url: str = Field(default_factory=lambda: default_database_url())
    """Default: ``sqlite:///`` + :func:`default_database_path`, whatever the working directory."""
    username: str | None = None
    password: SecretStr | None = None
    api_token: SecretStr | None = None
    secret_key: SecretStr | None = None
    """Signs session cookies; a random one per process when unset (logins end on restart)."""
    public_url: str = "http://127.0.0.1:8025"
    slack_webhook_url: SecretStr | None = None
    alert_interval: float = Field(default=60.0, gt=0)
    alert_max_queues: int = Field(default=10, ge=1)
    """More queues than this failing in one interval make one summary post, not one each."""
    retention_days: float = Field(default=30.0, gt=0)
    batch_size: int = Field(default=500, ge=1)
    """Dead letters committed (and acked) together by the collector."""
    batch_wait: float = Field(default=0.05, ge=0)
    """Seconds the collector waits for a batch to fill before committing what it has."""
    replay_batch_size: int = Field(default=100, ge=1)
    """Replays in flight at once during a bulk retry; bounds the load on the broker."""
    replay_timeout: float = Field(default=10.0, gt=0)
    session_max_age: int = Field(default=12 * 3600, ge=60)
    max_edit_bytes: int = Field(default=1024 * 1024, ge=1)
    """The largest body "Edit and try again" accepts."""
    login_attempts: int = Field(default=10, ge=1)
    """Wrong logins (UI or API Basic) per client address and per username per minute."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise settings_error(exc, "LETTERTHIEF_") from None

    @property
    def has_login(self) -> bool:
        """True when the UI (and HTTP Basic on the API) asks for a username and password."""
        return bool(self.username and self.password and self.password.get_secret_value())

    @property
    def token(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token else None

    @property
    def webhook(self) -> str | None:
        return self.slack_webhook_url.get_secret_value() if self.slack_webhook_url else None


def default_database_path() -> Path:
    """Where LetterThief keeps its SQLite database unless ``LETTERTHIEF_DATABASE_URL`` says
    otherwise: ``$XDG_DATA_HOME/letterthief/letterthief.db``, by default
    ``~/.local/share/letterthief/letterthief.db``. One place, so ``letterthief list`` run
    from any directory reads the letters ``letterthief serve`` stored."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "letterthief" / "letterthief.db"


def default_database_url() -> str:
    return f"sqlite:///{default_database_path()}"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only exposes the service to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def async_database_url(url: str) -> str:
    """Map the documented URL forms onto SQLAlchemy's async drivers.

    ``sqlite:///path`` → ``sqlite+aiosqlite:///path``; ``postgresql://`` and
    ``postgres://`` → ``postgresql+asyncpg://``. Explicit drivers are kept.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(
            f"LETTERTHIEF_DATABASE_URL {url!r} is not a URL; use sqlite:///letterthief.db "
            "or postgresql+asyncpg://user:password@host/db"
        )
    if scheme == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if scheme in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        return url
    raise ValueError(
        f"LETTERTHIEF_DATABASE_URL scheme {scheme!r} is not supported; "
        "use sqlite:///path or postgresql+asyncpg://…"
    )
