"""The bare reference server (cydispatch.bench.bare), run as the benchmark runs it.

It is started through the benchmark's own BareServer, so these tests also
hold the two to one contract: the ready line, port 0, the hello body.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from http_client import Connection
from observe import distinct_workers_answer, processes_in_group
from cydispatch.bench.server import BareServer
from waiting import DEADLINE, wait_until


@pytest.fixture
def bare_server():
    server = BareServer(workers=2)
    try:
        yield server.wait_ready(timeout=DEADLINE)
    finally:
        server.kill()   # the whole process group, whatever the test did


def test_keep_alive_connection_serves_several_requests(bare_server):
    with Connection(bare_server.host, bare_server.port) as conn:
        responses = []
        for _ in range(3):
            conn.request("/")
            responses.append(conn.response())
    assert [response.status for response in responses] == [200, 200, 200]
    assert len({response.pid for response in responses}) == 1
    for response in responses:
        assert response.headers["content-type"] == "text/plain"
        assert int(response.headers["content-length"]) == len(response.body)
        assert "date" in response.headers
        assert "connection" not in response.headers


def test_connection_close_is_honoured(bare_server):
    with Connection(bare_server.host, bare_server.port) as conn:
        conn.request("/", headers={"Connection": "close"})
        response = conn.response()
        assert response.status == 200
        assert response.headers["connection"] == "close"
        assert conn.closed_by_server()


def test_every_worker_answers(bare_server):
    assert len(distinct_workers_answer(bare_server, 2)) == 2


def test_sigterm_stops_every_process(bare_server):
    workers = distinct_workers_answer(bare_server, 2)
    bare_server.proc.send_signal(signal.SIGTERM)
    assert bare_server.proc.wait(DEADLINE) == 0
    # The parent reaps its workers before it exits: nothing is left, not even a zombie.
    assert processes_in_group(bare_server.pgid) == set()
    assert all(not os.path.exists(f"/proc/{pid}") for pid in workers)


def test_a_dead_worker_stops_the_server(bare_server):
    victim, _ = distinct_workers_answer(bare_server, 2)
    os.kill(victim, signal.SIGKILL)
    assert bare_server.proc.wait(DEADLINE) != 0
    assert processes_in_group(bare_server.pgid) == set()
    wait_until(lambda: f"worker {victim} exited" in bare_server.log,
               message="the parent to say which worker exited")


@pytest.mark.parametrize("args", [["--workers", "0"], ["--port", "x"], ["--nonsense"]])
def test_bad_arguments_are_one_line_and_exit_2(args):
    completed = subprocess.run(
        [sys.executable, "-m", "cydispatch.bench.bare", *args], capture_output=True,
        text=True, timeout=DEADLINE)
    assert completed.returncode == 2
    assert len(completed.stderr.splitlines()) == 1, completed.stderr
