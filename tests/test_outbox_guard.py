"""``pigeon listen`` and the tables of its listeners' outboxes."""

from __future__ import annotations

import textwrap
from pathlib import Path

from pigeon.settings import Settings
from tests.procs import ROOT, env_for, run_pigeon


def test_pigeon_listen_refuses_an_outbox_without_tables(
    tmp_path: Path, settings: Settings, prefix: str
) -> None:
    """It started, and every message failed its inbox insert ("no such table") through
    the retries into the dead letters. A forgotten ``create_tables()`` is a mistake, so it
    is one line naming the tables and the fix, exit 78 (as for settings errors)."""
    module = tmp_path / f"shop_{prefix}.py"
    module.write_text(
        textwrap.dedent(
            f"""
            from sqlalchemy import create_engine

            from pigeon import Pigeon
            from pigeon.outbox import Outbox

            app = Pigeon()
            box = Outbox(create_engine("sqlite:///{tmp_path / "shop.db"}"), app=app)


            @app.listener("{prefix}.shipped", outbox=box)
            def reserve(payload: object) -> None: ...
            """
        )
    )
    env = env_for(settings, f"{prefix}-shop", PYTHONPATH=f"{tmp_path}:{ROOT}")

    result = run_pigeon(env, "listen", f"{module.stem}:app")

    assert result.returncode == 78, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "outbox table pigeon_outbox and inbox table pigeon_inbox do not exist" in line
    assert "outbox.create_tables()" in line
    assert "--create-tables" in line
