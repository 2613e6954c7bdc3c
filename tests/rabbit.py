"""Private RabbitMQ nodes for the tests that stop, kill or reset a broker.

They run through ``scripts/rabbit-node.sh`` and ``scripts/cluster.sh``: own
node names, ports and data directories, so the machine's node on 5672 (and a
developer's queues or a running demo on it) is never touched.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE_SCRIPT = ROOT / "scripts" / "rabbit-node.sh"
CLUSTER_SCRIPT = ROOT / "scripts" / "cluster.sh"


def _run(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [*args], capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


@dataclass(frozen=True)
class Node:
    """One private node ``NAME@localhost`` listening for AMQP on ``port``."""

    name: str
    port: int

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        _run(str(NODE_SCRIPT), "start", self.name, str(self.port), str(self.port + 20000))

    def stop(self) -> None:
        _run(str(NODE_SCRIPT), "stop", self.name)

    def wipe(self) -> None:
        _run(str(NODE_SCRIPT), "wipe", self.name)

    def kill(self) -> None:
        """``kill -9`` the node's Erlang VM: no goodbye to clients or peers."""
        _run(str(NODE_SCRIPT), "kill", self.name)

    def freeze(self) -> int:
        """``SIGSTOP`` the node's VM: its sockets stay open and nothing answers, as in a
        network partition. Returns the pid for :meth:`thaw`."""
        pid = int(_run(str(NODE_SCRIPT), "pid", self.name))
        os.kill(pid, signal.SIGSTOP)
        return pid

    @staticmethod
    def thaw(pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    def is_up(self) -> bool:
        return "up" in _run(str(NODE_SCRIPT), "status", self.name).split()

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """``rabbitmqctl -n NAME@localhost ARGS`` (never the machine's node)."""
        return _run("rabbitmqctl", "-n", self.node, *args, timeout=timeout)

    async def actl(self, *args: str, timeout: float = 120) -> str:
        return await asyncio.to_thread(self.ctl, *args, timeout=timeout)


CHAOS_NODE = Node("pigeonchaos", 5721)
CLUSTER_NODES = (Node("pigeon1", 5701), Node("pigeon2", 5702), Node("pigeon3", 5703))


def cluster_url() -> str:
    return ",".join(node.url for node in CLUSTER_NODES)


def cluster_is_up() -> bool:
    return all(node.is_up() for node in CLUSTER_NODES)


def start_cluster() -> None:
    _run(str(CLUSTER_SCRIPT), "start", timeout=300)


def stop_cluster() -> None:
    _run(str(CLUSTER_SCRIPT), "stop", timeout=300)
