"""The order story end to end, under the real supervisord with the real supervisord.conf.

The test copies supervisord.conf into a temporary directory, so its %(here)s
puts var/ (logs, emails, databases, socket) there, and changes only what must
differ from a developer's `make demo`: the services' names (so their queues
are this run's own), LetterThief's port, and the path of the venv. The
exchanges and the dead-letter and unrouted queues come from the environment
supervisord passes on (PIGEON_EXCHANGE, ...), as in production.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import email
import email.policy
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
import xmlrpc.client
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from supervisor.datatypes import dict_of_key_value_pairs
from supervisor.xmlrpc import SupervisorTransport

from tests import leaks
from tests.conftest import AMQP_URL, Broker, settings_env, unique_settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
SERVICES = ("notification", "seller", "logistics")
PROGRAMS = {
    "letterthief",
    "orders-relay",
    "notification",
    "seller",
    "logistics:logistics-0",
    "logistics:logistics-1",
}

# Slow enough that a stop or a kill lands while messages are in flight.
SEND_DELAY = 1.0
BOOKING_DELAY = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)


def replace_once(text: str, old: str, new: str, count: int = 1) -> str:
    """``text.replace``, failing loudly when supervisord.conf no longer has ``old``."""
    assert text.count(old) == count, f"supervisord.conf should contain {old!r} {count}x"
    return text.replace(old, new)


def private_conf(prefix: str, port: int) -> str:
    text = (ROOT / "supervisord.conf").read_text()
    text = replace_once(text, "%(here)s/.venv/", f"{ROOT}/.venv/", count=5)
    text = replace_once(text, "--port 8025", f"--port {port}")
    for service in SERVICES:
        text = replace_once(
            text, f'PIGEON_SERVICE="{service}"', f'PIGEON_SERVICE="{prefix}-{service}"'
        )
    return text


@dataclass
class Story:
    home: Path
    prefix: str
    env: dict[str, str]
    port: int
    login: tuple[str, str]

    @property
    def var(self) -> Path:
        return self.home / "var"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.home / "supervisord.conf"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def supervisor(self, method: str, *args: Any) -> Any:
        """Call supervisord's XML-RPC interface (what supervisorctl uses) over its socket."""
        transport = SupervisorTransport(None, None, f"unix://{self.var / 'supervisor.sock'}")
        proxy: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            return getattr(proxy.supervisor, method)(*args)
        finally:
            transport.close()

    def info(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = self.supervisor("getProcessInfo", name)
        return info

    def place(self, count: int, region: str | None = None) -> list[str]:
        """Run the orders service; returns the order ids it printed."""
        args = ["--count", str(count), *(["--region", region] if region else [])]
        out = subprocess.run(
            [sys.executable, "-m", "listeners.orders", "place", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        ids = [line.split()[0] for line in out.stdout.splitlines()]
        assert len(ids) == count, out.stdout + out.stderr
        return ids

    def mail(self, order_id: str, kind: str) -> Path:
        return self.var / "mail" / f"{order_id}.{kind}.eml"

    def read_mail(self, order_id: str, kind: str) -> EmailMessage:
        message = email.message_from_bytes(
            self.mail(order_id, kind).read_bytes(), policy=email.policy.default
        )
        assert isinstance(message, EmailMessage)
        return message

    def has_mail(self, orders: list[str], *kinds: str) -> Callable[[], bool]:
        return lambda: all(self.mail(o, kind).exists() for o in orders for kind in kinds)

    def log(self, name: str) -> str:
        path = self.var / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def events(self, name: str, event: str) -> list[dict[str, Any]]:
        """The JSON log lines of program ``name`` whose event is ``event``."""
        found = []
        for line in self.log(name).splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", auth=self.login, timeout=10)

    def letters(self, order_id: str) -> list[dict[str, Any]]:
        """LetterThief's letters about ``order_id``, any status (its search covers the body)."""
        with self.api() as api:
            response = api.get("/api/dead-letters", params={"q": order_id})
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    def shipments(self) -> dict[str, tuple[str, str, int]]:
        with closing(sqlite3.connect(self.var / "seller.db")) as db:
            rows = db.execute("SELECT order_id, shipment_id, warehouse, parcels FROM shipments")
            return {
                order_id: (shipment, warehouse, parcels)
                for order_id, shipment, warehouse, parcels in rows
            }


def demo_login() -> tuple[str, str]:
    """The LetterThief login supervisord.conf gives the demo."""
    parser = configparser.RawConfigParser()
    parser.read(ROOT / "supervisord.conf")
    env = dict_of_key_value_pairs(parser.get("program:letterthief", "environment"))
    return env["LETTERTHIEF_USERNAME"], env["LETTERTHIEF_PASSWORD"]


def declared_names(env: dict[str, str], prefix: str) -> tuple[set[str], set[str]]:
    """The queues and exchanges the three apps declare, per `pigeon topology show`."""
    queues: set[str] = set()
    exchanges: set[str] = set()
    for service in SERVICES:
        shown = subprocess.run(
            [str(BIN / "pigeon"), "topology", "show", f"listeners.{service}:app"],
            env={**env, "PIGEON_SERVICE": f"{prefix}-{service}"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        for line in shown.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "queue":
                queues.add(rest.split()[0])
            elif kind == "exchange":
                exchanges.add(rest.split()[0])
    return queues, exchanges


async def delete(prefix: str, queues: set[str], exchanges: set[str]) -> None:
    broker = Broker(await aio_pika.connect(AMQP_URL), prefix)
    broker.queues |= queues
    broker.exchanges |= exchanges
    try:
        await broker.cleanup()
    finally:
        await broker.connection.close()


def running(story: Story) -> bool:
    try:
        infos = story.supervisor("getAllProcessInfo")
    except (OSError, xmlrpc.client.Error):
        return False
    states = {
        f"{i['group']}:{i['name']}" if i["group"] != i["name"] else i["name"]: i["statename"]
        for i in infos
    }
    fatal = [name for name, state in states.items() if state in ("FATAL", "BACKOFF")]
    assert not fatal, f"{fatal} could not start:\n" + "\n".join(
        story.log(name.split(":")[-1])[-2000:] for name in fatal
    )
    return states == dict.fromkeys(PROGRAMS, "RUNNING")


def healthy(story: Story) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{story.port}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def child_pids(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == parent:
                children.append(int(stat.parent.name))
    return children


def shut_down(story: Story, supervisord: subprocess.Popen[bytes]) -> None:
    """supervisorctl shutdown (retried until supervisord listens), then wait for it; if it
    hangs, SIGKILL it and its programs, so no process outlives the test."""
    deadline = time.monotonic() + 15
    while supervisord.poll() is None and story.ctl("shutdown").returncode != 0:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    try:
        supervisord.wait(90)
    except subprocess.TimeoutExpired:
        for pid in child_pids(supervisord.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        supervisord.kill()
        supervisord.wait()


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    prefix = leaks.new_prefix(__name__)
    home = tmp_path_factory.mktemp("story")
    port = free_port()
    conf = home / "supervisord.conf"
    conf.write_text(private_conf(prefix, port))
    (home / "var" / "log").mkdir(parents=True)
    # Only this run's settings: nothing from the developer's shell leaks in.
    env = {
        k: v
        for k, v in settings_env(unique_settings(prefix)).items()
        if not k.startswith(("LETTERTHIEF_", "NOTIFICATION_", "SELLER_", "LOGISTICS_", "ORDERS_"))
    }
    env |= {
        "PYTHONPATH": str(ROOT),
        "NOTIFICATION_SEND_DELAY": str(SEND_DELAY),
        "LOGISTICS_BOOKING_DELAY": str(BOOKING_DELAY),
        "LOGISTICS_PARTNERS_FILE": str(home / "var" / "partners.json"),
        "ORDERS_DATABASE": str(home / "var" / "orders.db"),
    }
    queues, exchanges = declared_names(env, prefix)
    story = Story(home, prefix, env, port, demo_login())
    with open(home / "supervisord.out", "wb") as out:
        supervisord = subprocess.Popen(
            [str(BIN / "supervisord"), "--nodaemon", "-c", str(conf)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: running(story), 60, "every program RUNNING")
        wait_until(lambda: healthy(story), 30, "LetterThief's /healthz answering 200")
        yield story
    finally:
        shut_down(story, supervisord)
        asyncio.run(delete(prefix, queues, exchanges))


def test_supervisorctl_shows_every_program_running(story: Story) -> None:
    result = story.ctl("status")

    assert result.returncode == 0, result.stdout + result.stderr
    states = dict(line.split()[:2] for line in result.stdout.splitlines())
    assert states == dict.fromkeys(PROGRAMS, "RUNNING")


def test_every_order_reaches_all_three_services_and_gets_both_emails(story: Story) -> None:
    orders = story.place(8)

    wait_until(story.has_mail(orders, "confirmation", "tracking"), 60, "both emails per order")
    assert set(orders) <= set(story.shipments())
    for order in orders:
        confirmation = story.read_mail(order, "confirmation")
        tracking = story.read_mail(order, "tracking")
        assert confirmation["Subject"] == f"Your order {order}"
        assert f"order {order} is on its way" in tracking.get_content()
        # One correlation id from order.placed to delivery.assigned, across services.
        assert confirmation["X-Pigeon-Correlation-Id"] == f"{order}.placed"
        assert tracking["X-Pigeon-Correlation-Id"] == f"{order}.placed"

    def pickups() -> dict[str, str]:
        return {
            e["order_id"]: e["correlation_id"]
            for name in ("logistics-0", "logistics-1")
            for e in story.events(name, "pickup.scheduled")
        }

    # seller's shipment.ready reached logistics, still correlated with the order.
    wait_until(lambda: set(orders) <= set(pickups()), 30, "a pickup per shipment")
    assert all(pickups()[order] == f"{order}.placed" for order in orders)


def test_an_order_nobody_can_deliver_waits_in_letterthief_until_try_again(story: Story) -> None:
    region = f"test-{uuid.uuid4().hex[:6]}"
    orders = story.place(2, region=region)
    queue = f"{story.prefix}-logistics.assign-partner"

    wait_until(lambda: all(story.letters(o) for o in orders), 60, "a letter per order")
    letters = {o: story.letters(o) for o in orders}
    for order, found in letters.items():
        assert len(found) == 1, found
        letter = found[0]
        assert letter["queue"] == queue
        assert letter["event"] == "order.placed"
        assert letter["status"] == "open"
        assert letter["reason"] == "handler-error"
        assert letter["exception_type"] == "listeners.logistics.NoPartnerForRegion"
        assert region in letter["exception_message"]
        assert letter["attempts"] == 3
        assert story.mail(order, "confirmation").exists()  # notification does not care
        assert not story.mail(order, "tracking").exists()

    subprocess.run(
        [sys.executable, "-m", "listeners.logistics", "add-partner", region, "Test Post"],
        env=story.env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    ids = [found[0]["id"] for found in letters.values()]
    with story.api() as api:
        retried = api.post("/api/dead-letters/retry", json={"ids": ids})
    assert retried.status_code == 200, retried.text
    assert retried.json()["done"] == 2, retried.json()

    wait_until(story.has_mail(orders, "tracking"), 30, "tracking emails after Try again")
    for order in orders:
        assert "with Test Post" in story.read_mail(order, "tracking")["Subject"]
        assert [x["status"] for x in story.letters(order)] == ["retried"]


def test_a_killed_logistics_process_is_restarted_and_no_order_is_lost(story: Story) -> None:
    victim = "logistics:logistics-0"
    before = story.info(victim)["pid"]
    orders = story.place(12)

    def booking_in_victim() -> bool:
        return any(e["order_id"] in orders for e in story.events("logistics-0", "partner.booking"))

    wait_until(booking_in_victim, 30, "logistics-0 booking one of the orders")
    os.kill(before, signal.SIGKILL)  # mid-booking: its unacked messages go back to the queue

    def restarted() -> bool:
        info = story.info(victim)
        return bool(info["statename"] == "RUNNING" and info["pid"] != before)

    wait_until(restarted, 30, "supervisor restarting logistics-0")
    assert "exited: logistics-0 (terminated by SIGKILL; not expected)" in story.log("supervisord")
    # A claim the killed process held is free again after its lease (30 s).
    wait_until(story.has_mail(orders, "confirmation", "tracking"), 90, "every order delivered")
    assert set(orders) <= set(story.shipments())


def test_stopping_a_listener_lets_its_work_in_flight_finish_and_exits_0(story: Story) -> None:
    orders = story.place(3)
    files = {f"{o}.confirmation.eml" for o in orders}

    def sending() -> bool:
        return any(e["file"] in files for e in story.events("notification", "email.sending"))

    wait_until(sending, 30, "notification sending a confirmation")
    try:
        stopped = story.ctl("stop", "notification")

        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        info = story.info("notification")
        assert info["statename"] == "STOPPED"
        assert info["exitstatus"] == 0
        assert "stopped: notification (exit status 0)" in story.log("supervisord")
        drained = story.events("notification", "worker.draining")
        assert drained, "pigeon did not drain: nothing was in flight"
        assert drained[-1]["in_flight"] >= 1
        started = {e["file"] for e in story.events("notification", "email.sending")} & files
        assert started, "nothing was in flight when the stop came"
        for name in started:  # finished during the drain, not abandoned
            assert (story.var / "mail" / name).exists()
    finally:
        assert story.ctl("start", "notification").returncode == 0
    # Whatever was not started yet went back to the queue and is sent now.
    wait_until(story.has_mail(orders, "confirmation", "tracking"), 60, "every email after restart")
