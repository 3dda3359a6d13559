"""`cydispatch serve` as a whole: real processes, sockets and signals, in every mode."""

from __future__ import annotations

import os
import select
import signal
import socket
import time

import pytest

from conftest import DEADLINE, alive, processes_in_group, wait_until
from http_client import Connection, get

MODES = ["dispatch", "reuseport", "shared"]
CPUS = sorted(os.sched_getaffinity(0))


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets in LISTEN state on `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port and fields[3] == "0A":
                inodes.add(int(fields[9]))
    return inodes


def listen_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on `port`."""
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "0A":
                return int(fields[4].partition(":")[2], 16)
    raise AssertionError(f"no listener on port {port}")


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def pids_answering(server, count: int) -> list[int]:
    return [get(server.host, server.port).pid for _ in range(count)]


def distinct_workers_answer(server, wanted: int = 2) -> set[int]:
    seen: set[int] = set()
    wait_until(lambda: seen.add(get(server.host, server.port).pid) or len(seen) >= wanted,
               interval=0, message=f"{wanted} distinct workers to answer")
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_several_pinned_workers_answer(start_server, mode):
    server = start_server("--mode", mode)
    pids = distinct_workers_answer(server)
    workers = server.started_workers()
    assert pids <= set(workers)
    assert server.worker_pids() == set(workers)
    # Worker i is pinned to the i-th CPU we may use: single and distinct.
    affinities = sorted(tuple(os.sched_getaffinity(pid)) for pid in workers)
    assert affinities == sorted((CPUS[i % len(CPUS)],) for i in range(2))
    assert {cpu for (cpu,) in affinities} == set(workers.values())


def test_more_workers_than_cpus_cycle_over_the_cpus(start_server):
    count = len(CPUS) + 1
    server = start_server(workers=count)
    cpus = sorted(next(iter(os.sched_getaffinity(pid))) for pid in server.started_workers())
    assert cpus == sorted(CPUS[i % len(CPUS)] for i in range(count))


def test_no_pin_leaves_workers_on_every_cpu(start_server):
    server = start_server("--no-pin")
    for pid in server.started_workers():
        assert os.sched_getaffinity(pid) == set(CPUS)
    assert server.find(r"Worker \d+ started \(not pinned\)")


@pytest.mark.parametrize("mode", MODES)
def test_who_holds_the_listening_socket(start_server, mode):
    server = start_server("--mode", mode)
    listeners = listening_inodes(server.port)
    assert listeners
    primary_holds = bool(socket_inodes(server.pid) & listeners)
    workers_hold = [bool(socket_inodes(pid) & listeners) for pid in server.worker_pids()]
    if mode == "dispatch":
        assert primary_holds and not any(workers_hold)
        assert len(listeners) == 1
    elif mode == "reuseport":
        assert not primary_holds and all(workers_hold)
        assert len(listeners) == 2, "one SO_REUSEPORT socket per worker"
    else:
        assert primary_holds and all(workers_hold)
        assert len(listeners) == 1, "one socket, inherited"


@pytest.mark.parametrize("mode", MODES)
def test_killed_worker_is_replaced_on_the_same_cpu(start_server, mode):
    server = start_server("--mode", mode)
    workers = server.started_workers()
    victim, cpu = next(iter(workers.items()))
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(rf"Worker {victim} died \(signal SIGKILL\)")
    server.wait_for_log(r"Starting a new worker")
    replacement = wait_until(lambda: set(server.started_workers()) - set(workers),
                             message="a replacement worker")
    (new_pid,) = replacement
    assert server.started_workers()[new_pid] == cpu
    assert os.sched_getaffinity(new_pid) == {cpu}
    statuses = [get(server.host, server.port).status for _ in range(50)]
    assert statuses == [200] * 50
    assert victim not in {r for r in server.worker_pids()}


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_exits_0_and_leaves_no_process(start_server, mode):
    server = start_server("--mode", mode)
    workers = set(server.started_workers())
    assert get(server.host, server.port).status == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(DEADLINE) == 0
    assert not processes_in_group(server.pgid)
    assert not any(alive(pid) for pid in workers)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=5)


def test_sigterm_lets_requests_in_progress_finish(start_server):
    server = start_server()
    with Connection(server.host, server.port) as conn:
        conn.request("/slow?ms=400")
        # Wherever the request is (backlog, channel, worker), it is served.
        server.proc.send_signal(signal.SIGTERM)
        response = conn.response()
        assert response.status == 200
        assert response.body.endswith(b"after 400 ms of work")
        assert conn.closed_by_server()
    assert server.proc.wait(DEADLINE) == 0


@pytest.mark.parametrize("mode", MODES)
def test_killing_the_primary_leaves_no_worker(start_server, mode):
    server = start_server("--mode", mode)
    workers = set(server.started_workers())
    os.kill(server.pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in workers),
               message="workers to exit after the primary died")


def test_idle_keep_alive_connections_time_out(start_server):
    server = start_server("--keepalive-timeout", "1")
    with Connection(server.host, server.port) as conn:
        conn.request("/")
        assert conn.response().status == 200
        began = time.monotonic()
        assert conn.closed_by_server()
        assert time.monotonic() - began >= 1.0


def test_ipv6_literal_host(start_server):
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"this machine has no IPv6 loopback: {exc}")
    server = start_server("--host", "::1")
    assert server.find(r"http://\[::1\]:\d+")
    assert get("::1", server.port).status == 200


def test_round_robin_alternates(start_server):
    server = start_server("--policy", "round-robin")
    distinct_workers_answer(server)   # both workers are ready
    pids = pids_answering(server, 20)
    assert len(set(pids)) == 2
    assert all(a != b for a, b in zip(pids, pids[1:], strict=False)), pids


def test_least_conn_avoids_the_worker_holding_connections(start_server):
    server = start_server()
    held = [Connection(server.host, server.port) for _ in range(6)]
    try:
        owners = {}
        for conn in held:
            conn.request("/")
            owners.setdefault(conn.response().pid, []).append(conn)
        assert len(owners) == 2, "least-conn spreads idle connections"
        (busy, busy_conns), (free, free_conns) = sorted(
            owners.items(), key=lambda item: -len(item[1]))
        for conn in free_conns:
            conn.close()
        # Once the free worker has seen its connections close it gets every
        # new connection: the busy one still holds its own.
        wait_until(lambda: get(server.host, server.port).pid == free,
                   message="the free worker to get a connection")
        assert pids_answering(server, 10) == [free] * 10
    finally:
        for conn in held:
            conn.close()


def test_full_workers_leave_connections_in_the_backlog(start_server):
    server = start_server("--max-conns", "1", workers=1)
    first = Connection(server.host, server.port)
    first.request("/")
    assert first.response().status == 200
    with Connection(server.host, server.port) as second:
        second.request("/")
        wait_until(lambda: listen_queue(server.port) == 1,
                   message="the second connection to wait in the backlog")
        # While the worker is full the primary must leave it there.
        observed_until = time.monotonic() + 0.5
        while time.monotonic() < observed_until:
            assert listen_queue(server.port) == 1
            time.sleep(0.01)
        first.close()
        assert second.response().status == 200


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_waits_without_spinning_and_loses_nothing(start_server):
    # 64 descriptors per process: two workers hold ~100 connections between them.
    server = start_server("--keepalive-timeout", "60",
                          wrapper=("prlimit", "--nofile=64:64"))
    conns = []
    for _ in range(150):
        conn = Connection(server.host, server.port)
        conn.request("/")
        conns.append(conn)
    try:
        starved = r"out of file descriptors|Cannot accept connections \(EMFILE\)"
        server.wait_for_log(starved)
        # Stalled: nothing frees a descriptor until clients close. The primary
        # must sleep through this, not retry in a loop.
        before = cpu_seconds(server.pid)
        time.sleep(2.5)
        assert cpu_seconds(server.pid) - before < 0.5
        said = server.find(r"Worker \d+ is out of file descriptors")
        assert len(said) <= 2, "said once per worker, not once per retry"
        # Clients that got their answer leave; the rest are then served.
        pending = list(conns)
        served = 0
        deadline = time.monotonic() + DEADLINE
        while pending and time.monotonic() < deadline:
            readable, _, _ = select.select(pending, [], [], 0.2)
            for conn in readable:
                assert conn.response().status == 200
                conn.close()
                pending.remove(conn)
                served += 1
        assert served == 150, f"{len(pending)} connections never answered"
    finally:
        for conn in conns:
            conn.close()
    assert server.find(r"Accepting connections again") or not server.find(
        r"Cannot accept connections")
    assert not server.find("died")


def busy_worker(server, conn, path: str) -> int:
    """Send `path` and wait until a worker is burning CPU on it; its pid."""
    (pid,) = server.started_workers()
    before = cpu_seconds(pid)
    conn.request(path)
    wait_until(lambda: cpu_seconds(pid) - before >= 0.05,
               message="the worker to start on the request")
    return pid


def test_graceful_timeout_kills_what_does_not_finish(start_server):
    server = start_server("--graceful-timeout", "0.2", workers=1)
    with Connection(server.host, server.port) as conn:
        busy_worker(server, conn, "/slow?ms=1000")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(DEADLINE) == 0
        with pytest.raises(ConnectionError):
            conn.response()
    server.wait_for_log(r"Graceful timeout: killing 1 workers")
    assert not processes_in_group(server.pgid)


def test_second_sigint_stops_at_once(start_server):
    server = start_server("--graceful-timeout", "60", workers=1)
    with Connection(server.host, server.port) as conn:
        busy_worker(server, conn, "/slow?ms=1000")
        conn.request("/slow?ms=1000")     # pipelined: more work held
        server.proc.send_signal(signal.SIGINT)
        server.wait_for_log(r"Stopping: finishing requests in progress")
        server.proc.send_signal(signal.SIGINT)
        server.wait_for_log(r"Stopping now")
        assert server.proc.wait(DEADLINE) == 0
    assert not processes_in_group(server.pgid)
