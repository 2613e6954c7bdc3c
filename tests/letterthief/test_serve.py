"""``letterthief serve`` as supervisor runs it: a real process, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import httpx

from pigeon.settings import Settings
from tests.conftest import Broker, settings_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serve_runs_collector_web_and_api_and_stops_cleanly_on_sigterm(
    settings: Settings, sqlite_url: str, broker: Broker
) -> None:
    broker.queues |= {settings.dead_letter_queue, settings.unrouted_queue}
    broker.exchanges |= {settings.dead_letter_exchange, settings.unrouted_exchange,
                         settings.exchange}  # fmt: skip
    port = _free_port()
    env = {
        **settings_env(settings),
        "LETTERTHIEF_DATABASE_URL": sqlite_url,
        "LETTERTHIEF_API_TOKEN": "tok",
    }
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("letterthief")),
        "serve",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            for _ in range(400):  # the web answers first; the collector connects meanwhile
                try:
                    health = await c.get("/healthz")
                    if health.status_code == 200 and health.json()["collector"] == "consuming":
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            assert health.json()["collector"] == "consuming"
            assert (await c.get("/api/dead-letters")).status_code == 401
            listed = await c.get("/api/dead-letters", headers={"Authorization": "Bearer tok"})
            assert listed.json() == {"items": [], "total": 0, "next_cursor": None}
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    logs = (await process.stderr.read()).decode()
    assert "letterthief.serving" in logs
    assert "guest:guest" not in logs  # the broker password is masked
