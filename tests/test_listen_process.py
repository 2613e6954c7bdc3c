"""``pigeon listen`` and ``pigeon dispatch`` as real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pigeon import TopologyError, topology
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.procs import (
    PIGEON,
    ROOT,
    drain_and_stop,
    env_for,
    recorded,
    recorder,
    start_listener,
    stop,
    wait_for_log,
    wait_recorded,
)


async def test_two_thousand_events_from_another_process_arrive_exactly_once(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    setup = recorder(make_app, broker, tmp_path)
    env = setup.env
    log = tmp_path / "listen.log"
    proc = start_listener(env, "--concurrency", "32", log=log)
    try:
        wait_for_log(log, "worker.consuming")
        producer = textwrap.dedent(
            """
            import pigeon
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(16) as pool:
                ids = list(pool.map(
                    lambda i: pigeon.dispatch("test.order.placed", {"order_id": f"o-{i}"}),
                    range(2000),
                ))
            print(len(set(ids)))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", producer], env=env, capture_output=True, timeout=120, check=True
        )
        assert out.stdout.decode().strip().splitlines()[-1] == "2000"
        wait_recorded(tmp_path / "rec.txt", 2000, timeout=90)
        assert await drain_and_stop(broker, f"{setup.app.service}.record", [proc]) == [0]
        handled = recorded(tmp_path / "rec.txt")
        assert len(handled) == 2000
        assert len(set(handled)) == 2000
    finally:
        assert stop(proc) == 0


async def test_pigeon_dispatch_from_the_shell_prints_the_id_the_listener_sees(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    setup = recorder(make_app, broker, tmp_path)
    env = setup.env
    log = tmp_path / "listen.log"
    proc = start_listener(env, log=log)
    try:
        wait_for_log(log, "worker.consuming")
        out = subprocess.run(
            [*PIGEON, "dispatch", "test.order.placed", json.dumps({"order_id": "o-1"})],
            env=env,
            capture_output=True,
            timeout=60,
            check=True,
        )
        message_id = out.stdout.decode().strip()
        assert len(message_id) == 36
        assert wait_recorded(tmp_path / "rec.txt", 1) == [message_id]
    finally:
        assert stop(proc) == 0


async def test_pigeon_dispatch_rejects_a_payload_that_is_not_json(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app = make_app("shell")
    env = env_for(app.settings, app.service or "")
    out = subprocess.run(
        [*PIGEON, "dispatch", "test.order.placed", "{not json"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert b"PAYLOAD is not JSON" in out.stderr


async def test_sigterm_lets_in_flight_handlers_finish_and_exits_zero(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    setup = recorder(
        make_app,
        broker,
        tmp_path,
        RECORDER_MODE="slow",
        RECORDER_SECONDS="1.5",
    )
    app, rec, env = setup.app, setup.rec, setup.env
    log = tmp_path / "listen.log"
    proc = start_listener(env, "--concurrency", "4", "--shutdown-timeout", "20", log=log)
    wait_for_log(log, "worker.consuming")
    ids = [await app.dispatch_async("test.order.placed", {"order_id": f"o-{i}"}) for i in range(10)]
    started = wait_recorded(rec, 4, kind="start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    finished = recorded(rec)
    assert sorted(finished) == sorted(started), "every started handler finished before exit"
    assert b"worker.stopped" in log.read_bytes()
    # Nothing lost: what was not started is still queued and handled by the next process.
    proc = start_listener(env, log=log)
    try:
        wait_recorded(rec, 10, timeout=60)
        assert sorted(set(recorded(rec))) == sorted(ids)
    finally:
        assert stop(proc) == 0
    await app.close()


async def test_the_listener_keeps_its_start_up_heap_out_of_full_gc_passes(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    setup = recorder(make_app, broker, tmp_path)
    proc = start_listener(setup.env, log=setup.log)
    try:
        wait_for_log(setup.log, "worker.consuming")
        lines = setup.log.read_text().splitlines()
        frozen = [json.loads(line) for line in lines if "worker.heap_frozen" in line]
        assert frozen[0]["objects"] > 10_000
    finally:
        assert stop(proc) == 0
    await setup.app.close()


async def test_a_killed_listener_leaves_only_its_unfinished_message_to_be_redelivered(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    """Acks are coalesced (one ``multiple`` ack for a run of finished messages), yet a
    message still in progress is never covered by one: after a SIGKILL only it comes back."""
    setup = recorder(make_app, broker, tmp_path)
    app, rec, env, log = setup.app, setup.rec, setup.env, setup.log
    proc = start_listener(env, "--concurrency", "32", log=log)
    wait_for_log(log, "worker.consuming")
    # One burst, so that many finish in the same loop turn and their acks coalesce.
    payloads = [{"i": i} for i in range(50)] + [{"mode": "hang"}]
    payloads += [{"i": i} for i in range(50, 100)]
    ids = await app.dispatch_many(("test.order.placed", p) for p in payloads)
    hung = ids.pop(50)
    assert sorted(wait_recorded(rec, 100)) == sorted(ids)
    assert hung in recorded(rec, "start")
    time.sleep(0.5)  # the acks leave at the end of the loop turn; give them far more
    proc.kill()
    proc.wait(10)
    before = len(recorded(rec, "start"))
    assert before == 101
    proc = start_listener(env, "--shutdown-timeout", "1", log=log)
    try:
        wait_recorded(rec, before + 1, kind="start")
        await drain_and_stop(broker, f"{app.service}.record", [proc])  # all it got, and no more
        assert recorded(rec, "start")[before:] == [hung]
    finally:
        stop(proc)
    await app.close()


async def test_topology_commands_show_and_declare_the_listener_queue(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    app = make_app("recorder")
    env = env_for(app.settings, app.service or "")
    broker.queues.add(f"{app.service}.record")
    broker.queues.add(f"{app.service}.record.retry.200ms")
    shown = subprocess.run(
        [*PIGEON, "topology", "show", "tests.apps.recorder:app"],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    ).stdout.decode()
    assert f"queue {app.service}.record " in shown
    assert "x-queue-type=quorum" in shown
    assert f"x-dead-letter-exchange={app.settings.dead_letter_exchange}" in shown
    assert f"bound to {app.settings.exchange} with 'test.order.placed'" in shown
    assert f"queue {app.service}.record.retry.200ms" in shown
    subprocess.run(
        [*PIGEON, "topology", "declare", "tests.apps.recorder:app"],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    assert await broker.count(f"{app.service}.record") == 0
    assert await broker.count(f"{app.service}.record.retry.200ms") == 0


async def test_listen_with_a_mismatched_queue_exits_with_the_fix(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    app = make_app("recorder")
    queue = f"{app.service}.record"
    broker.queues.add(queue)
    wanted = topology.listener_queue(app.settings, queue, ["test.order.placed"])
    channel = await broker.connection.channel()
    await channel.declare_queue(
        queue, durable=True, arguments={**wanted.arguments, "x-delivery-limit": 5}
    )
    env = env_for(app.settings, app.service or "")
    log = tmp_path / "listen.log"
    proc = start_listener(env, log=log)
    assert proc.wait(30) == 78, "a configuration error exits EX_CONFIG so supervisor gives up"
    text = log.read_text()
    assert f"queue {queue} exists with x-delivery-limit=5" in text
    assert "this app wants x-delivery-limit=20" in text
    assert f"rabbitmqctl delete_queue {queue}" in text


async def test_a_classic_queue_in_the_way_is_named_in_the_error(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("notification")

    @app.listener("test.order.placed")
    async def send(payload: dict[str, object]) -> None: ...

    broker.queues.add(send.queue)
    channel = await broker.connection.channel()
    await channel.declare_queue(send.queue, durable=True)
    with pytest.raises(TopologyError, match=f"queue {send.queue} exists with x-"):
        await run_worker(app)


async def test_metrics_port_serves_prometheus_metrics_and_health(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    import urllib.request

    from tests.tcpproxy import TcpProxy

    app = make_app("recorder")
    rec = tmp_path / "rec.txt"
    port = TcpProxy.free_port()
    env = env_for(app.settings, app.service or "", RECORDER_FILE=str(rec))
    log = tmp_path / "listen.log"
    proc = start_listener(env, "--metrics-port", str(port), log=log)
    broker.queues.add(f"{app.service}.record")
    try:
        wait_for_log(log, "worker.consuming")
        await app.dispatch_async("test.order.placed", {"n": 1})
        wait_recorded(rec, 1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as health:
            assert health.status == 200
        queue = f"{app.service}.record"
        counted = f'pigeon_messages_total{{event="test.order.placed",outcome="acked",queue="{queue}"}} 1.0'

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                return str(page.read().decode())

        await eventually(lambda: counted in metrics(), message="the outcome counted")
        text = metrics()
        assert f'pigeon_handler_duration_seconds_count{{queue="{queue}"}} 1.0' in text
        assert f'pigeon_in_flight{{queue="{queue}"}} 0.0' in text
    finally:
        assert stop(proc) == 0


def test_healthz_answers_503_while_the_worker_has_no_broker_connection() -> None:
    import urllib.error
    import urllib.request

    from pigeon import Pigeon
    from pigeon.metrics import serve_metrics
    from pigeon.worker import Worker
    from tests.tcpproxy import TcpProxy

    app = Pigeon(service="idle")

    @app.listener("test.order.placed")
    async def idle(payload: dict[str, object]) -> None: ...

    port = TcpProxy.free_port()
    server = serve_metrics(port, Worker(app).ready.is_set, host="127.0.0.1")
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert info.value.code == 503
        info.value.close()
    finally:
        server.shutdown()
        server.server_close()


async def test_sigterm_stops_the_listener_even_when_its_log_pipe_is_gone(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    setup = recorder(make_app, broker, tmp_path)
    env = setup.env
    proc = subprocess.Popen(
        [*PIGEON, "listen", "tests.apps.recorder:app"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while b"worker.consuming" not in proc.stdout.readline():
        assert time.monotonic() < deadline, "listener did not start"
    proc.stdout.close()  # what a SIGKILLed supervisor leaves behind
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


async def test_topology_declare_with_the_broker_down_says_so_in_one_line(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app = make_app("recorder")
    env = env_for(app.settings, app.service or "")
    env["PIGEON_URL"] = "amqp://guest:s3cret@127.0.0.1:1/"
    out = subprocess.run(
        [*PIGEON, "topology", "declare", "tests.apps.recorder:app"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert b"pigeon: cannot reach the broker at amqp://guest:***@127.0.0.1:1/" in out.stderr
    assert b"Traceback" not in out.stderr
    assert b"s3cret" not in out.stderr
