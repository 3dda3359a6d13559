"""`cydispatch serve` as a whole: real processes, sockets and signals, in every mode."""

from __future__ import annotations

import os
import select
import signal
import socket
import time

import pytest

from http_client import Connection, get
from observe import (alive, busy_worker, cpu_seconds, distinct_workers_answer,
                     listening_inodes, processes_in_group,
                     socket_inodes)
from waiting import DEADLINE, wait_until

MODES = ["dispatch", "reuseport", "shared"]
CPUS = sorted(os.sched_getaffinity(0))


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
    for _ in range(3):
        assert get(server.host, server.port).status == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(DEADLINE) == 0
    if mode == "dispatch":
        # The last line sums up what the primary did with connections.  On
        # a loaded machine a worker slow to run can have one taken back
        # (test_admin says the same): then it was handed again, not lost.
        [final] = server.wait_for_log(r"Primary \d+ stopped: 3 connections accepted, "
                                      r"(\d+) taken back from workers that did not take "
                                      r"them, (\d+) handed again")
        assert final.group(1) == final.group(2)
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
    wait_until(server.output_ended, message="the workers' last lines")
    assert len(server.find(r"the primary is gone; finishing up")) == len(workers)
    # They finish up quietly: no traceback, no "cannot start".
    assert "Traceback" not in server.log and "cannot start" not in server.log


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


def test_dispatch_workers_open_handed_connections_as_uvloop_s_accept_does(start_server):
    server = start_server("--log-level", "debug")
    server.wait_for_log(r"opens handed connections as uvloop's own accept does", count=2)
    assert {get(server.host, server.port).status for _ in range(20)} == {200}
    assert "slower public path" not in server.log


def test_with_another_uvloop_than_the_build_s_handed_connections_are_still_served(
        start_server, tmp_path):
    # pyworker.adoption reaches into the uvloop it was compiled against; with
    # any other, workers say so and take uvloop's public path.
    (tmp_path / "sitecustomize.py").write_text("import uvloop\nuvloop.__version__ = '0.0.1'\n")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    server = start_server(env={"PYTHONPATH": path})
    server.wait_for_log(r"handed connections take uvloop's slower public path: "
                        r"cydispatch was built against uvloop \S+, and uvloop 0\.0\.1", count=2)
    assert {get(server.host, server.port).status for _ in range(20)} == {200}
    assert len(distinct_workers_answer(server)) == 2


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
        # Once per worker, not once per retry (that would be dozens by now),
        # nor again when its handoffs are taken back and handed anew.
        assert len(said) <= 2, server.log
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
