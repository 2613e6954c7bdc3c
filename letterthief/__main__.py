"""The ``letterthief`` command (and ``python -m letterthief``).

A plain ``pip install pigeon-bus`` has the command but not the web stack
LetterThief needs; that is one line naming the extra, not a traceback.
"""

from __future__ import annotations

import sys

EXTRA_MODULES = frozenset(
    {
        "fastapi",
        "jinja2",
        "uvicorn",
        "sqlalchemy",
        "aiosqlite",
        "alembic",
        "httpx",
        "multipart",
        "python_multipart",
        "itsdangerous",
        "starlette",
    }
)


def main() -> None:
    try:
        from letterthief.cli import main as cli
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXTRA_MODULES:
            raise
        sys.stderr.write(
            f"letterthief: the letterthief extra is not installed (no module {exc.name}): "
            "pip install 'pigeon-bus[letterthief]'\n"
        )
        sys.exit(1)
    cli()


if __name__ == "__main__":
    main()
