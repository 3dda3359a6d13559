"""--admin: metrics, health and status from the primary; `cydispatch status`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_LINE, APPS, CYDISPATCH, Server
from http_client import Connection, get
from waiting import wait_until



def admin_url(server: Server) -> str:
    host, port = server.wait_for_log(ADMIN_LINE)[0].groups()
    return f"http://{host}:{port}"


def fetch(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def metrics(server: Server) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted labels: value}}, parsed by prometheus_client."""
    status, content_type, text = fetch(admin_url(server) + "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


def health(server: Server) -> tuple[int, dict]:
    status, content_type, body = fetch(admin_url(server) + "/healthz")
    assert content_type == "application/json"
    return status, json.loads(body)


def test_metrics_count_connections_and_workers(start_server):
    server = start_server("--admin", "127.0.0.1:0")
    for _ in range(5):
        assert get(server.host, server.port).status == 200
    with Connection(server.host, server.port) as held:   # one stays open
        held.request("/")
        assert held.response().status == 200
        # The five closed ones are seen closed by their workers soon after.
        seen = wait_until(
            lambda: (m := metrics(server))
            and sum(m["cydispatch_worker_connections"].values()) == 1 and m,
            message="one connection left open")
        assert seen["cydispatch_connections_accepted_total"][()] == 6
        redispatched = seen["cydispatch_connections_redispatched_total"][()]
        stolen = seen["cydispatch_connections_stolen_total"][()]
        assert seen["cydispatch_workers"] == {(("state", "ready"),): 2,
                                              (("state", "starting"),): 0,
                                              (("state", "draining"),): 0}
        assert set(seen["cydispatch_worker_connections"]) == {(("worker", "0"),),
                                                              (("worker", "1"),)}
        assert all(v > 1 << 20 for v in
                   seen["cydispatch_worker_resident_memory_bytes"].values())
        assert seen["cydispatch_worker_restarts_total"] == {
            (("reason", r),): 0 for r in ("crash", "watchdog", "recycle", "reload")}
    # Usually none is handed again, but on a loaded machine a worker can look
    # stuck for a moment and have a connection taken back: the metric must
    # say what the primary's own final count says.
    assert server.stop() == 0
    final = server.wait_for_log(r"(\d+) connections accepted, \d+ taken back from "
                                r"workers that did not take them, (\d+) handed again, "
                                r"(\d+) taken over by a sibling before their worker reached them")
    assert [tuple(map(int, m.groups())) for m in final] == [(6, redispatched, stolen)]


@pytest.mark.parametrize("mode", ["dispatch", "shared", "reuseport"])
def test_requests_are_counted_per_worker_across_restarts(start_server, mode):
    # Counted by each worker as it answers; the last response may reach the
    # client just before its count is stored: wait for the counts.  Outside
    # dispatch mode a worker's channel closes before it exits, and its page
    # went with it: the counts once went back to 0.
    server = start_server("--admin", "127.0.0.1:0", "--mode", mode)
    for _ in range(20):
        assert get(server.host, server.port).status == 200

    def requests() -> dict:
        return metrics(server)["cydispatch_worker_requests_total"]

    wait_until(lambda: sum(requests().values()) == 20, message="20 requests counted")
    assert set(requests()) == {(("worker", "0"),), (("worker", "1"),)}
    # A reload replaces both workers: the slots' totals carry on from theirs.
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"Reload complete: every worker replaced")
    wait_until(lambda: len(server.worker_pids()) == 2, message="the old workers to exit")
    for _ in range(10):
        assert get(server.host, server.port).status == 200
    wait_until(lambda: sum(requests().values()) == 30, message="30 requests counted")



def test_a_slot_removed_and_added_again_keeps_counting_from_its_total(start_server):
    # TTOU then TTIN: the new slot has the old one's index, its label.
    server = start_server("--admin", "127.0.0.1:0")
    for _ in range(20):
        assert get(server.host, server.port).status == 200

    def requests() -> dict:
        return {dict(labels)["worker"]: value for labels, value
                in metrics(server)["cydispatch_worker_requests_total"].items()}

    before = wait_until(lambda: sum(requests().values()) == 20 and requests(),
                        message="20 requests counted")
    server.proc.send_signal(signal.SIGTTOU)
    server.wait_for_log(r"Worker \d+ exited")
    server.proc.send_signal(signal.SIGTTIN)
    wait_until(lambda: len(server.worker_pids()) == 2, message="a worker added again")
    assert requests() == before


def durations(server: Server) -> dict[str, float]:
    """The request-duration histogram: {"le=0.25": cumulative count, ..., "count", "sum"}."""
    seen = metrics(server)
    histogram = {f"le={dict(labels)['le']}": value for labels, value in
                 seen["cydispatch_request_duration_seconds_bucket"].items()}
    histogram["count"] = seen["cydispatch_request_duration_seconds_count"][()]
    histogram["sum"] = seen["cydispatch_request_duration_seconds_sum"][()]
    return histogram


def test_request_durations_are_a_histogram_across_restarts(start_server, tmp_path):
    # Counted by the workers in their shared pages as each request is answered.
    server = start_server("--admin", "127.0.0.1:0", "--app-dir", APPS, "edge_asgi:app",
                          env={"APP_EVENTS": str(tmp_path / "events")})
    for _ in range(5):
        assert get(server.host, server.port, "/quick").status == 200
    for _ in range(2):
        assert get(server.host, server.port, "/sleep?s=0.3").status == 200
    seen = wait_until(lambda: (h := durations(server)) and h["count"] == 7 and h,
                      message="7 requests in the histogram")
    assert seen["le=+Inf"] == 7
    # The sleeps took at least 0.3 s each, the others (answered at once) not 0.25.
    assert seen["le=0.25"] == 5
    assert 0.6 <= seen["sum"] < 0.6 + 5 * 0.25 + 2 * 0.5
    buckets = [value for key, value in seen.items() if key.startswith("le=")]
    assert buckets == sorted(buckets)   # cumulative
    # Workers that die take nothing with them: their counts stay in the total.
    for pid in server.started_workers():
        os.kill(pid, signal.SIGKILL)
    server.wait_for_log(r"Worker \d+ started", count=4)
    assert get(server.host, server.port, "/quick").status == 200
    wait_until(lambda: durations(server)["count"] == 8, message="8 requests counted")
    assert durations(server)["le=+Inf"] == 8


def test_builtin_app_requests_are_timed_too(start_server):
    server = start_server("--admin", "127.0.0.1:0")
    for _ in range(6):
        assert get(server.host, server.port).status == 200
    seen = wait_until(lambda: (h := durations(server)) and h["count"] == 6 and h,
                      message="6 requests in the histogram")
    # The built-in app answers within the callback that read the request.
    assert seen["le=0.25"] == 6 and seen["sum"] < 6 * 0.25


def test_pipelined_builtin_requests_are_timed_each_on_its_own(start_server):
    # Both arrive in one read: the quick one's time must not include the
    # slow one answered ahead of it.
    server = start_server("--admin", "127.0.0.1:0")
    with Connection(server.host, server.port) as client:
        client.send(b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.response().status == 200
        assert client.response().status == 200
    seen = wait_until(lambda: (h := durations(server)) and h["count"] == 2 and h,
                      message="2 requests in the histogram")
    assert seen["le=0.25"] == 1 and seen["sum"] >= 0.3


@pytest.mark.parametrize("mode", ["reuseport", "shared"])
def test_metrics_in_the_baseline_modes_have_no_primary_counters(start_server, mode):
    server = start_server("--mode", mode, "--admin", "127.0.0.1:0")
    assert get(server.host, server.port).status == 200
    seen = metrics(server)
    assert "cydispatch_connections_accepted_total" not in seen
    assert seen["cydispatch_workers"][(("state", "ready"),)] == 2


def test_restarts_are_counted_by_reason(start_server):
    server = start_server("--admin", "127.0.0.1:0")
    victim = next(iter(server.started_workers()))
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(r"Worker \d+ started", count=3)
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"Reload complete: every worker replaced")
    restarts = metrics(server)["cydispatch_worker_restarts_total"]
    assert restarts[(("reason", "crash"),)] == 1
    assert restarts[(("reason", "reload"),)] == 2
    assert restarts[(("reason", "recycle"),)] == 0


def test_a_watchdog_restart_is_counted(start_server):
    server = start_server("--admin", "127.0.0.1:0", "--timeout", "2")
    frozen = next(iter(server.started_workers()))
    os.kill(frozen, signal.SIGSTOP)
    server.wait_for_log(rf"Worker {frozen} has not answered")
    restarts = metrics(server)["cydispatch_worker_restarts_total"]
    assert restarts[(("reason", "watchdog"),)] == 1, server.log
    assert restarts[(("reason", "crash"),)] == 0


def test_a_recycle_is_counted(start_server):
    server = start_server("--admin", "127.0.0.1:0", "--max-requests", "10")
    for _ in range(25):
        assert get(server.host, server.port).status == 200
    recycled = len(server.wait_for_log(r"Worker \d+ replaces worker \d+"))
    restarts = metrics(server)["cydispatch_worker_restarts_total"]
    assert restarts[(("reason", "recycle"),)] >= recycled >= 1
    assert restarts[(("reason", "reload"),)] == 0


def test_healthz_is_503_until_a_worker_is_ready(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server("--app-dir", APPS, "--admin", "127.0.0.1:0", "slow_startup:app",
                          ready=False, env={"STARTUP_GATE": str(gate)})
    status, body = health(server)
    assert (status, body["status"], body["workers_ready"]) == (503, "starting", 0)
    gate.touch()
    server.wait_ready()
    status, body = health(server)
    assert (status, body) == (200, {"status": "serving", "workers_ready": 2,
                                    "workers_starting": 0, "workers_draining": 0})


def test_healthz_is_503_once_a_stop_has_begun(start_server, tmp_path):
    # A request in progress keeps the primary up through the stop: meanwhile a
    # load balancer must see it leave.
    gate = tmp_path / "gate"
    gate.touch()
    server = start_server("--app-dir", APPS, "--admin", "127.0.0.1:0", "slow_startup:app",
                          env={"STARTUP_GATE": str(gate)})
    url = admin_url(server)
    answers = []
    sleeper = threading.Thread(target=lambda: answers.append(
        get(server.host, server.port, "/sleep").status))
    sleeper.start()
    wait_until(lambda: sum(metrics(server)["cydispatch_worker_connections"].values()) == 1,
               message="the request to reach a worker")
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for_log(r"Stopping: finishing requests in progress")
    status, _, body = fetch(url + "/healthz")
    assert (status, json.loads(body)["status"]) == (503, "stopping")
    sleeper.join(30)
    assert answers == [200]
    assert server.proc.wait(30) == 0


def test_unknown_admin_path_is_404(start_server):
    server = start_server("--admin", "127.0.0.1:0")
    status, content_type, body = fetch(admin_url(server) + "/nope")
    assert status == 404 and "/metrics" in json.loads(body)["error"]



def test_admin_answers_head_and_refuses_other_methods(start_server):
    # HEAD is what load balancers' checks and `curl -I` send.
    server = start_server("--admin", "127.0.0.1:0")
    url = admin_url(server)
    wait_until(lambda: health(server)[0] == 200, message="the server healthy")
    for path in ("/healthz", "/metrics", "/status"):
        with urllib.request.urlopen(urllib.request.Request(url + path, method="HEAD"),
                                    timeout=10) as response:
            assert response.status == 200
            assert int(response.headers["Content-Length"]) > 0
            assert response.read() == b""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url + "/metrics", data=b"x",
                                                      method="POST"), timeout=10)
    assert refused.value.code == 405 and refused.value.headers["Allow"] == "GET, HEAD"



def test_admin_connections_are_few_and_none_lasts(start_server):
    # Each is a thread and a descriptor in the primary: a client trickling
    # a byte a second (never idle long enough for the read timeout) held
    # both for as long as it liked, and any number of them could.
    import socket
    import time
    from cydispatch.admin import CONNECTION_SECONDS, MAX_CONNECTIONS
    server = start_server("--admin", "127.0.0.1:0")
    host, port = server.wait_for_log(ADMIN_LINE)[0].groups()
    tasks = lambda: len(os.listdir(f"/proc/{server.pid}/task"))  # noqa: E731
    before = tasks()
    held = [socket.create_connection((host, int(port)), timeout=10)
            for _ in range(MAX_CONNECTIONS + 4)]
    opened = time.monotonic()
    open_ = set(held)

    def trickle() -> bool:
        """A byte from each connection still open; True once all are closed."""
        for conn in list(open_):
            try:
                conn.sendall(b"G")
                conn.setblocking(False)
                closed = conn.recv(4096) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            conn.setblocking(True)
            if closed:
                open_.discard(conn)
        return not open_

    try:
        wait_until(lambda: trickle() is not None and len(open_) <= MAX_CONNECTIONS,
                   message="the connections past the limit closed at once")
        assert tasks() <= before + MAX_CONNECTIONS
        assert time.monotonic() - opened < CONNECTION_SECONDS
        assert len([conn for conn in held if conn not in open_]) == 4
        wait_until(lambda: time.sleep(0.5) or trickle(), timeout=CONNECTION_SECONDS + 20,
                   message="every trickling connection ended")
        assert time.monotonic() - opened > CONNECTION_SECONDS - 1
    finally:
        for conn in held:
            conn.close()
    assert health(server)[0] == 200


def test_a_malformed_accept_header_gets_the_text_format(start_server):
    # prometheus_client's negotiation raises on this one: no 500, no traceback.
    server = start_server("--admin", "127.0.0.1:0")
    request = urllib.request.Request(
        admin_url(server) + "/metrics",
        headers={"Accept": "application/openmetrics-text; version=x"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        assert "cydispatch_workers" in response.read().decode()
    assert "Traceback" not in server.log


def status_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CYDISPATCH, "status", *args], capture_output=True, text=True,
                          timeout=30)


def test_status_shows_every_worker(start_server):
    server = start_server("--admin", "127.0.0.1:0")
    admin = admin_url(server).removeprefix("http://")
    result = status_command("--admin", admin)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(rf"primary {server.pid} \(dispatch, least-conn\) on .*: serving", lines[0])
    assert "messages broadcast 0, dropped 0 (a worker's outbox was full)" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("worker"))
    assert lines[header].split() == ["worker", "pid", "cpu", "state", "conns", "queued",
                                     "requests", "restarts", "rss", "up"]
    rows = [line.split() for line in lines[header + 1:]]
    assert {int(row[1]) for row in rows} == set(server.started_workers())
    # "31.2 MB" is two words: the memory is the 9th and 10th.
    assert all(row[3] == "ready" and row[9] == "MB" for row in rows), rows
    as_json = json.loads(status_command("--admin", admin, "--json").stdout)
    assert {w["pid"] for w in as_json["workers"]} == set(server.started_workers())


def test_status_without_a_server_is_one_line():
    result = status_command("--admin", "127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith("cydispatch: error: cannot reach http://127.0.0.1:1/status")
    assert len(result.stderr.strip().splitlines()) == 1



@pytest.mark.parametrize("answer, words", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "did not answer HTTP"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "did not answer HTTP"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "answered JSON, but not a server's"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "did not answer JSON"),
], ids=["ssh", "cut-off", "an-app-s-status", "not-json"])
def test_status_against_something_else_is_one_line(answer, words):
    # --admin pointed at the wrong port: whatever listens there, one line.
    import socket
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def answer_once():
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(answer)
        peer = threading.Thread(target=answer_once, daemon=True)
        peer.start()
        result = status_command("--admin", "127.0.0.1:%d" % listener.getsockname()[1])
        peer.join(10)
    assert result.returncode == 1
    assert result.stderr.startswith("cydispatch: error: ") and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("value, words", [
    ("9000", "'9000' is not HOST:PORT"),
    ("::1:9000", "put an IPv6 address in brackets"),
    ("127.0.0.1:99999", "is not HOST:PORT"),
])
def test_bad_admin_address_is_one_line(value, words):
    result = subprocess.run([CYDISPATCH, "serve", "--admin", value], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_admin_address_in_use_is_one_line(start_server):
    server = start_server()
    result = subprocess.run([CYDISPATCH, "serve", "--port", "0",
                             "--admin", f"{server.host}:{server.port}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"cydispatch: error: cannot listen on "
                                     f"{server.host}:{server.port}: address already in use")


def test_the_queue_depth_falls_while_a_request_is_slow_and_status_says_so(start_server):
    # Two workers on one CPU: deeper batches (4), and 2 while some request is
    # slow, back to 4 a second after the last.  An operator sees all of it.
    cpu = min(os.sched_getaffinity(0))
    server = start_server("--admin", "127.0.0.1:0", wrapper=("taskset", "-c", str(cpu)))
    url = admin_url(server)

    def depth() -> dict:
        return json.loads(fetch(url + "/status")[2])["queue_depth"]

    assert depth() == {"now": 4, "full": 4, "slow": 2, "slow_spells": 0, "slow_seconds": 0}
    with Connection(server.host, server.port) as slow:
        slow.request("/slow?ms=400")
        # The primary looks at the workers when it has a connection to hand.
        wait_until(lambda: get(server.host, server.port).status == 200
                   and depth()["now"] == 2, message="the slow depth while /slow runs")
        assert slow.response().status == 200
    wait_until(lambda: depth()["now"] == 4, message="the full depth a second after")
    after = depth()
    assert after["slow_spells"] >= 1 and after["slow_seconds"] >= 1.0, after
    samples = metrics(server)
    assert samples["cydispatch_queue_depth"][()] == 4
    assert samples["cydispatch_queue_depth_slow_spells_total"][()] >= 1
    assert samples["cydispatch_queue_depth_slow_seconds_total"][()] >= 1.0
    table = status_command("--admin", url.removeprefix("http://")).stdout.splitlines()
    assert any(re.fullmatch(r"queue depth now 4: 4, and 2 while some request is slow "
                            r"\(\d+\.\d s in (1 spell|\d+ spells)\)", line) for line in table), table


def test_a_baseline_mode_has_no_queue_depth(start_server):
    server = start_server("--admin", "127.0.0.1:0", "--mode", "reuseport")
    url = admin_url(server)
    assert json.loads(fetch(url + "/status")[2])["queue_depth"] is None
    assert "cydispatch_queue_depth" not in metrics(server)
    table = status_command("--admin", url.removeprefix("http://")).stdout
    assert "queue depth" not in table
