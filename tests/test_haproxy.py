"""A real HAProxy, running deploy/haproxy.cfg as shipped, in front of two cydispatch instances.

HAProxy sends PROXY v2 headers and checks each instance's /healthz on its
admin endpoint.  Clients connect from their own 127.0.0.x addresses, and the
app must see each one's; a reload of one instance and a stop of the other,
under load, must cost the clients no request.
"""

from __future__ import annotations

import csv
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from conftest import ADMIN_LINE, APPS, Server, free_port
from http_client import body_of, read_until_closed
from cydispatch.bench.server import ServerProcess
from load_client import LoadClient, failures, summary
from waiting import wait_until

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
CONFIG = Path(__file__).parent.parent / "deploy" / "haproxy.cfg"
# Loopback addresses the clients connect from, one per load thread.
SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")

pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")


def start_instance(events: Path) -> Server:
    """A cydispatch instance as the config's comment runs it, on loopback.

    Its app appends what it does to `events` (tests/apps/edge_asgi.py).
    """
    server = Server("--app-dir", APPS, "edge_asgi:app", "--proxy-protocol",
                    "--forwarded-allow-ips", "127.0.0.1", "--admin", "127.0.0.1:0",
                    workers=1, env={"APP_EVENTS": str(events)})
    server.events = events
    try:
        server.wait_ready()
        server.admin_port = int(server.wait_for_log(ADMIN_LINE)[0].group(2))
    except BaseException:
        server.stop()   # not in the fixture's hands yet
        raise
    return server


class HAProxy(ServerProcess):
    """`haproxy -db -f deploy/haproxy.cfg`, its addresses set through the environment."""

    def __init__(self, instances: list[Server], stats_socket: Path) -> None:
        port = free_port()
        env = {"FRONTEND": f"127.0.0.1:{port}", "STATS_SOCKET": str(stats_socket)}
        for number, instance in enumerate(instances, 1):
            env[f"SERVER{number}"] = f"127.0.0.1:{instance.port}"
            env[f"SERVER{number}_ADMIN_PORT"] = str(instance.admin_port)
        super().__init__([HAPROXY, "-db", "-f", str(CONFIG)], env)
        self.stats_socket = stats_socket
        self.host, self.port = "127.0.0.1", port

    def servers(self) -> dict[str, dict[str, str]]:
        """The backend's servers as the runtime API's `show stat` reports them."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(str(self.stats_socket))
                sock.sendall(b"show stat\n")
                text = b""
                while chunk := sock.recv(65536):
                    text += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            return {}      # not listening yet
        rows = csv.DictReader(text.decode().removeprefix("# ").splitlines())
        return {row["svname"]: row for row in rows
                if row["pxname"] == "cydispatch" and row["svname"] != "BACKEND"}

    def status_of(self, server: str) -> str:
        return self.servers().get(server, {}).get("status", "")

    def wait_up(self, *servers: str) -> None:
        wait_until(lambda: all(self.status_of(s) == "UP" for s in servers),
                   message=f"HAProxy to see {', '.join(servers)} up:\n{self.log}")


@pytest.fixture
def cluster(tmp_path):
    """(HAProxy, [instance 1, instance 2]): all stopped at teardown, whatever happened."""
    instances: list[Server] = []
    haproxy = None
    try:
        for number in range(1, 3):
            instances.append(start_instance(tmp_path / f"events{number}"))
        haproxy = HAProxy(instances, tmp_path / "haproxy.sock")
        haproxy.wait_up("app1", "app2")
        yield haproxy, instances
    finally:
        if haproxy is not None:
            haproxy.stop(timeout=10)
        for instance in instances:
            instance.stop()


def get_from(address: tuple[str, int], path: str, source: str) -> bytes:
    """A GET from `source`; the body of its 200 answer."""
    with socket.create_connection(address, timeout=30, source_address=(source, 0)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        return body_of(read_until_closed(sock))


def test_the_app_sees_each_clients_own_address(cluster):
    haproxy, instances = cluster
    for source in SOURCES * 2:
        client = get_from((haproxy.host, haproxy.port), "/client", source).decode()
        assert client.split()[0] == source
    # Both instances served: leastconn spreads even one request at a time.
    served = {get_from((haproxy.host, haproxy.port), "/pid", "127.0.0.2") for _ in range(20)}
    workers = {str(pid).encode() for i in instances for pid in i.worker_pids()}
    assert served <= workers and len(served) == 2, (served, workers)


def test_a_reload_and_a_stop_behind_haproxy_fail_no_request(cluster, tmp_path):
    haproxy, (reloaded, stopped) = cluster
    release = tmp_path / "release"
    with LoadClient(haproxy.host, haproxy.port, path="/client", threads=len(SOURCES),
                    pause=0.01, sources=SOURCES) as load:
        wait_until(lambda: load.count("ok") >= 50, message="50 requests through HAProxy")

        reloaded.proc.send_signal(signal.SIGHUP)
        reloaded.wait_for_log("Reload complete")
        since = time.monotonic()
        wait_until(lambda: load.count("ok", since=since) >= 50,
                   message="50 requests after the reload")

        # A request held open on the stopping instance keeps it draining
        # until the test says, so that HAProxy's checks meet its 503.
        with socket.create_connection((stopped.host, stopped.port), timeout=30) as held:
            held.sendall(b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 80\r\n"
                         b"POST /hold?release=" + str(release).encode() + b" HTTP/1.1\r\n"
                         b"Host: t\r\nContent-Length: 1\r\n\r\nx")
            wait_until(lambda: stopped.events.exists()
                       and "holding" in stopped.events.read_text(),
                       message="the held request to reach the app")
            stopped.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: haproxy.status_of("app2").startswith("DOWN"),
                       message=f"HAProxy to take app2 out:\n{haproxy.log}")
            check = haproxy.servers()["app2"]
            assert stopped.proc.poll() is None     # still finishing its request...
            assert (check["check_status"], check["check_code"]) == ("L7STS", "503")
            since = time.monotonic()
            wait_until(lambda: load.count("ok", since=since) >= 50,
                       message="50 requests with app2 out")
            release.touch()
            assert b"HTTP/1.1 200 " in held.recv(65536)
        stopped.proc.wait(30)
        since = time.monotonic()
        wait_until(lambda: load.count("ok", since=since) >= 50,
                   message="50 requests after app2 stopped")
    outcomes = load.results()
    assert not failures(outcomes), (summary(outcomes), failures(outcomes)[:5], haproxy.log)
    # Every answer named the address its own client connected from.
    assert all(o.body.split()[0].decode() == o.source for o in outcomes)
