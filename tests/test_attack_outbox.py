"""An outside tester's attack on the transactional outbox and inbox.

Each test here reproduces a defect found by trying ``pigeon.outbox`` as an
outsider would: mistyped or unreachable database URLs given to the CLI, a
handler that outlives its timeout inside the inbox transaction, messages
stored in the outbox that the relay can never publish, and headers whose
types the outbox did not keep.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.outbox_support import pg_name, pg_url
from tests.procs import PIGEON, ROOT

__all__ = ["pg_name"]


def _run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    env.update({"PYTHONPATH": str(ROOT), "PIGEON_DISPATCH_TIMEOUT": "5"})
    return subprocess.run(
        [*PIGEON, "outbox", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _bad_urls(tmp_path: Path, pg: str) -> dict[str, tuple[str, str]]:
    """name -> (DATABASE_URL, a word the one-line error must contain)."""
    return {
        "not-a-url": ("shop.db", "sqlite:///path"),
        "no-such-directory": (f"sqlite:///{tmp_path / 'missing' / 'shop.db'}", "cannot open"),
        "no-tables-sqlite": (f"sqlite:///{tmp_path / 'empty.db'}", "--create-tables"),
        "no-tables-postgres": (pg_url(pg), "--create-tables"),
        "no-such-database": (pg_url(f"{pg}_missing"), "does not exist"),
        "database-down": ("postgresql+psycopg://postgres@127.0.0.1:1/shop", "cannot reach"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not-a-url",
        "no-such-directory",
        "no-tables-sqlite",
        "no-tables-postgres",
        "no-such-database",
        "database-down",
    ],
)
def test_outbox_status_says_what_is_wrong_with_the_database_in_one_line(
    case: str, tmp_path: Path, pg_name: str
) -> None:
    url, word = _bad_urls(tmp_path, pg_name)[case]

    result = _run("status", url)

    assert result.returncode in (69, 78), result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert word in line, line


@pytest.mark.parametrize("case", ["not-a-url", "no-tables-sqlite", "no-tables-postgres"])
def test_a_relay_that_can_never_work_exits_78_with_one_line(
    case: str, tmp_path: Path, pg_name: str
) -> None:
    url, word = _bad_urls(tmp_path, pg_name)[case]

    result = _run("relay", url)

    assert result.returncode == 78, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert word in line, line
