"""The file a listener app run by ``pigeon listen`` in a subprocess test writes its steps to.

One line per step (``start ID``, ``done ID`` ...), appended with a single
``write`` to a file opened ``O_APPEND``, so several processes can share it
and a line is never torn, even when the process is killed right after.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def journal(variable: str, default: str) -> Callable[[str], None]:
    """An ``append(line)`` writing to the file named by environment ``variable``."""
    path = os.environ.get(variable, default)

    def append(line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    return append
