"""Messages between workers (cydispatch.cluster): real workers, through a real primary."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time

import pytest

from conftest import APPS, Server, serving
from http_client import Connection, get
from test_admin import admin_url, metrics, status_command
from waiting import DEADLINE, wait_until
from cydispatch import cluster
from cydispatch.messages import OUTBOX_BYTES

FLOOD_SIZE = 60_000     # bytes of one flood message: near the 64 KiB limit


def ask(conn: Connection, path: str) -> tuple[int, dict]:
    conn.request(path)
    response = conn.response()
    return response.status, json.loads(response.body)


def connect_to_each_worker(server: Server, workers: int = 2) -> dict[int, Connection]:
    """A keep-alive connection to every worker, by its cluster.worker_id.

    Connections that reach a worker found already stay open meanwhile: the
    next one then goes to a worker with fewer (least-conn), or hashes
    elsewhere (reuseport).
    """
    found: dict[int, Connection] = {}
    spare: list[Connection] = []
    deadline = time.monotonic() + DEADLINE
    try:
        while len(found) < workers:
            assert time.monotonic() < deadline, f"reached only workers {sorted(found)}"
            conn = Connection(server.host, server.port)
            _, state = ask(conn, "/received")
            if state["worker_id"] in found:
                spare.append(conn)
                if len(spare) > 32:     # a kernel-balanced mode: keeping them does not help
                    spare.pop(0).close()
            else:
                found[state["worker_id"]] = conn
    finally:
        for conn in spare:
            conn.close()
    return found


def received(conn: Connection) -> list:
    return ask(conn, "/received")[1]["received"]


def tagged(conn: Connection) -> list[tuple[str, int]]:
    """(tag, sender) of every tagged message this connection's worker received, in order."""
    return [(obj["tag"], sender) for obj, sender in received(conn) if obj.get("tag")]


@pytest.fixture(scope="module")
def cluster_server():
    """One dispatch-mode server of tests/apps/cluster_app.py for the tests that only talk."""
    with serving("--app-dir", APPS, "cluster_app:app") as server:
        yield server


@pytest.mark.parametrize("mode", ["dispatch", "reuseport", "shared"])
def test_a_broadcast_reaches_every_worker_the_sender_too(start_server, mode):
    server = start_server("--mode", mode, "--app-dir", APPS, "cluster_app:app")
    conns = connect_to_each_worker(server)
    assert set(conns) == {0, 1}
    for worker_id, conn in conns.items():
        _, state = ask(conn, "/received")
        # Set before the app was imported, not only once it serves.
        assert state["imported_as"] == worker_id
    status, body = ask(conns[0], "/broadcast?tag=hello")
    assert (status, body) == (200, {"worker_id": 0})
    for conn in conns.values():
        wait_until(lambda: tagged(conn) == [("hello", 0)], message="the broadcast")


def test_every_worker_gets_the_messages_in_the_same_order(cluster_server):
    conns = connect_to_each_worker(cluster_server)
    sent = []
    for k in range(10):
        for worker_id, conn in conns.items():
            tag = f"order-{worker_id}-{k}"
            assert ask(conn, f"/broadcast?tag={tag}")[0] == 200
            sent.append((tag, worker_id))

    def ours(conn):
        return [m for m in tagged(conn) if m[0].startswith("order-")]

    for conn in conns.values():
        wait_until(lambda: len(ours(conn)) == len(sent), message="20 messages")
    # Each sender's in the order it sent them; the same sequence in every worker.
    assert ours(conns[0]) == ours(conns[1])
    for worker_id in conns:
        assert [m for m in ours(conns[0]) if m[1] == worker_id] == \
            [m for m in sent if m[1] == worker_id]


def test_an_oversized_message_is_refused_in_the_sender(cluster_server):
    conns = connect_to_each_worker(cluster_server)
    status, body = ask(conns[1], "/broadcast?tag=big&size=70000")
    assert status == 413
    assert "too large" in body["error"] and "65536 bytes" in body["error"]
    # The worker goes on, on the same connection, and so do its messages.
    assert ask(conns[1], "/broadcast?tag=after-big")[0] == 200
    for conn in conns.values():
        wait_until(lambda: ("after-big", 1) in tagged(conn), message="the next message")
        assert not [t for t, _ in tagged(conn) if t == "big"]


def test_a_handler_that_raises_is_logged_and_the_others_run(cluster_server):
    conns = connect_to_each_worker(cluster_server)
    assert ask(conns[0], "/broadcast?tag=refused&raise=1")[0] == 200
    cluster_server.wait_for_log(r"this handler refuses the message", count=2)
    for conn in conns.values():
        wait_until(lambda: ("refused", 0) in tagged(conn), message="the other handler")
    assert ask(conns[1], "/broadcast?tag=after-raise")[0] == 200
    for conn in conns.values():
        wait_until(lambda: ("after-raise", 1) in tagged(conn), message="a later message")


def test_worker_ids_are_kept_by_the_replacement_of_a_killed_worker(start_server):
    server = start_server("--app-dir", APPS, "cluster_app:app")
    conns = connect_to_each_worker(server)
    pids = {worker_id: ask(conn, "/received")[1]["pid"] for worker_id, conn in conns.items()}
    for conn in conns.values():
        conn.close()
    os.kill(pids[1], signal.SIGKILL)
    server.wait_for_log(r"Worker \d+ started", count=3)
    conns = connect_to_each_worker(server)
    replaced = ask(conns[1], "/received")[1]
    assert replaced["pid"] not in pids.values()
    assert replaced["imported_as"] == 1
    assert ask(conns[0], "/received")[1]["pid"] == pids[0]
    # The replacement is in the cluster: it sends and receives.
    assert ask(conns[1], "/broadcast?tag=from-new")[0] == 200
    for conn in conns.values():
        wait_until(lambda: ("from-new", 1) in tagged(conn), message="the new worker's message")


def test_a_wsgi_app_broadcasts_from_its_threads(start_server):
    server = start_server("--app-dir", APPS, "--threads", "4", "cluster_wsgi:app")
    conns = connect_to_each_worker(server)
    status, body = ask(conns[1], "/broadcast?tag=from-a-thread")
    assert status == 200 and body["broadcast_from"]
    assert "MainThread" not in body["broadcast_from"]
    for conn in conns.values():
        wait_until(lambda: [[{"tag": "from-a-thread"}, 1]] == received(conn),
                   message="the WSGI app's broadcast")


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_stopped_worker_makes_the_primary_drop_its_messages_not_hoard_them(start_server):
    # --timeout 0: the watchdog must not replace the stopped worker meanwhile.
    server = start_server("--app-dir", APPS, "--admin", "127.0.0.1:0", "--timeout", "0",
                          "cluster_app:app")
    conns = connect_to_each_worker(server)
    stopped_pid = ask(conns[1], "/received")[1]["pid"]
    started = resident_bytes(server.pid)
    rounds, per_round = 8, 100
    sent = rounds * per_round
    os.kill(stopped_pid, signal.SIGSTOP)
    try:
        for k in range(rounds):
            status, body = ask(conns[0], f"/flood?first={k * per_round}&count={per_round}"
                                         f"&size={FLOOD_SIZE}&batch=20")
            assert (status, body) == (200, {"sent": per_round})
            # Meanwhile the primary accepts and hands out new connections.
            for _ in range(5):
                assert get(server.host, server.port, "/").status == 200
            if k == 0:
                # The stopped worker's outbox is full by now (6 MB were sent).
                full = resident_bytes(server.pid)
        end = resident_bytes(server.pid)
        seen = metrics(server)
        dropped = seen["cydispatch_messages_dropped_total"][()]
        assert seen["cydispatch_messages_broadcast_total"][()] == sent
        # 48 MB were broadcast; what waits for the stopped worker is bounded,
        # and once its outbox is full the primary stops growing.
        assert sent * FLOOD_SIZE > 10 * OUTBOX_BYTES
        assert full - started < 3 * OUTBOX_BYTES, f"the primary grew by {full - started}"
        assert end - full < OUTBOX_BYTES // 4, f"then by {end - full} bytes"
        assert dropped >= sent - 2 * OUTBOX_BYTES // FLOOD_SIZE
        # An operator sees the same counts in `cydispatch status`.
        shown = status_command("--admin", admin_url(server).removeprefix("http://"))
        assert f"messages broadcast {sent}, dropped {int(dropped)} " in shown.stdout, shown
    finally:
        os.kill(stopped_pid, signal.SIGCONT)
    # Every message either reached the worker, in order, or was counted dropped.
    def flood_seen():
        return [obj["flood"] for obj, _ in received(conns[1]) if "flood" in obj]

    wait_until(lambda: len(flood_seen()) == sent - dropped,
               message="what waited for the stopped worker")
    indexes = flood_seen()
    assert indexes == sorted(set(indexes))
    assert len(received(conns[0])) == sent


@pytest.fixture
def local_handlers():
    """cluster's handlers as the test leaves them: restored afterwards."""
    saved = list(cluster._handlers)
    yield
    cluster._handlers[:] = saved


def test_outside_cydispatch_broadcast_calls_the_local_handlers(local_handlers, caplog):
    assert cluster.worker_id is None
    calls = []

    @cluster.on_message
    def broken(obj, sender_id):
        raise RuntimeError("broken handler")

    cluster.on_message(lambda obj, sender_id: calls.append((obj, sender_id)))
    # No loop here: at once, as the JSON would arrive.
    with caplog.at_level(logging.ERROR, logger="cydispatch.cluster"):
        cluster.broadcast({"pair": (1, 2)})
    assert calls == [({"pair": [1, 2]}, None)]
    assert "broken handler" in caplog.text
    # From another thread with no loop: at once, in that thread.
    thread = threading.Thread(target=cluster.broadcast, args=("threaded",))
    thread.start()
    thread.join()
    assert calls[-1] == ("threaded", None)

    async def in_a_loop():
        arrived = asyncio.Event()

        @cluster.on_message
        async def on_loop(obj, sender_id):
            arrived.set()

        cluster.broadcast("looped")
        assert calls[-1] == ("threaded", None)   # not yet: on the loop's next turn
        await asyncio.wait_for(arrived.wait(), 5)
        assert calls[-1] == ("looped", None)

    asyncio.run(in_a_loop())
    with pytest.raises(ValueError, match="65536 bytes"):
        cluster.broadcast("x" * 70_000)
    with pytest.raises(TypeError):
        cluster.broadcast({1, 2})
