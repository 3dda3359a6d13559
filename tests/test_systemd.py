"""systemd: socket activation (systemd-socket-activate) and sd_notify (a socket the test binds)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import CYDISPATCH, free_port
from http_client import Connection, get
from observe import distinct_workers_answer
from waiting import wait_until

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate is not installed (apt-get install systemd)")


def connected(host: str, port: int) -> socket.socket | None:
    try:
        return socket.create_connection((host, port), timeout=10)
    except ConnectionRefusedError:
        return None


@needs_activate
@pytest.mark.parametrize("mode", ["dispatch", "shared"])
def test_serves_the_socket_systemd_passes(start_server, mode):
    port = free_port()
    server = start_server("--mode", mode, ready=False,
                          wrapper=(ACTIVATE, "-l", f"127.0.0.1:{port}"))
    server.wait_for_log(rf"Listening on 127.0.0.1:{port}")
    # systemd-socket-activate starts the server on the first connection,
    # which waits in the passed socket's backlog meanwhile.
    with Connection("127.0.0.1", port) as first:
        first.request("/", headers={"Connection": "close"})
        assert first.response().status == 200
    server.wait_ready()
    assert server.port == port      # --port 0 was not bound: the passed socket serves
    assert server.find(rf"Serving the socket systemd passed \(http://127.0.0.1:{port}\)")
    assert len(distinct_workers_answer(server, 2)) == 2


@needs_activate
def test_reuseport_cannot_serve_a_passed_socket():
    port = free_port()
    proc = subprocess.Popen([ACTIVATE, "-l", f"127.0.0.1:{port}", CYDISPATCH, "serve",
                             "--mode", "reuseport"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        client = wait_until(lambda: connected("127.0.0.1", port),
                            message="systemd-socket-activate to listen")
        with client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert proc.wait(30) == 1
        errors = [line for line in proc.stderr.read().splitlines()
                  if line.startswith("cydispatch")]
        assert errors == ["cydispatch: error: a socket from systemd (LISTEN_FDS) is served "
                          "with --mode dispatch or shared, not reuseport"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_listen_fds_meant_for_another_process_are_ignored(start_server):
    # Inherited by accident from an activated parent: not ours, so we bind.
    server = start_server(env={"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    assert get(server.host, server.port).status == 200
    assert not server.find("Serving the socket systemd passed")


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket the test binds."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = str(path)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30) -> dict:
        """The first message not yet consumed that sets `key` (to `value`)."""
        deadline = time.monotonic() + timeout
        while True:
            for index, message in enumerate(self.messages):
                if key in message and (value is None or message[key] == value):
                    del self.messages[:index + 1]
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} from the server in {timeout} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.splitlines()))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


def test_ready_reloading_and_stopping_are_notified(start_server, notify):
    server = start_server(env={"NOTIFY_SOCKET": notify.path})
    ready = notify.wait_for("READY", "1")
    assert ready["STATUS"] == f"Serving {server.url.rstrip('/')} with 2 workers"
    # READY came once every worker had started.
    assert len(server.started_workers()) == 2
    server.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1")
    # MONOTONIC_USEC is CLOCK_MONOTONIC, which systemd compares with its own.
    assert abs(int(reloading["MONOTONIC_USEC"]) / 1e6 - time.monotonic()) < 30
    notify.wait_for("READY", "1")
    # Sent once the reload completed (the log line comes first; our reader
    # of the server's stderr may be a moment behind).
    server.wait_for_log(r"Reload complete")
    server.proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING", "1")
    assert server.proc.wait(30) == 0



def test_a_reload_whose_workers_cannot_start_still_ends_with_ready(start_server, notify,
                                                                    tmp_path):
    # systemd waits for READY=1 after RELOADING=1: without it the unit stays
    # "reloading" and `systemctl reload` fails at its timeout.
    from test_resilience import broken_uvloop
    server = start_server(env={"NOTIFY_SOCKET": notify.path,
                               **broken_uvloop(tmp_path, later=True)})
    notify.wait_for("READY", "1")
    (tmp_path / "broken").touch()   # from now on, new workers fail to start
    server.proc.send_signal(signal.SIGHUP)
    notify.wait_for("RELOADING", "1")
    ready = notify.wait_for("READY", "1")
    assert "the reload failed" in ready["STATUS"]
    server.wait_for_log(r"Replacement workers die before they are ready")


def test_watchdog_pings_at_half_the_interval(start_server, notify):
    start_server(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    notify.wait_for("READY", "1")
    first = notify.wait_for("WATCHDOG", "1")
    pings = 1
    started = time.monotonic()
    while pings < 5:
        notify.wait_for("WATCHDOG", "1", timeout=5)
        pings += 1
    # Every 0.2 s: 4 more within well under the 0.4 s deadline each.
    assert first and time.monotonic() - started < 4


def test_no_watchdog_pings_for_another_process(start_server, notify):
    server = start_server(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000",
                               "WATCHDOG_PID": "1"})
    notify.wait_for("READY", "1")
    server.proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING", "1")
    assert server.proc.wait(30) == 0
    assert not any("WATCHDOG" in message for message in notify.messages)
