"""Start the real `cydispatch` command and stop it, whatever the test did.

Each server runs in its own session (so its own process group); the finalizer
SIGKILLs the whole group after trying a clean stop, so no worker outlives a
test, even a failed one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from observe import children_of
from cydispatch.bench.server import STARTED, CydispatchServer

def free_port() -> int:
    """A loopback port nothing listens on now (for configs that need one up front)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The command installed next to this Python (a virtualenv), else on PATH.
CYDISPATCH = (shutil.which("cydispatch", path=os.path.dirname(sys.executable))
              or shutil.which("cydispatch"))


class Server(CydispatchServer):
    """A running `cydispatch serve`, with what the tests read off it."""

    def __init__(self, *args: str, workers: int = 2, **kwargs) -> None:
        super().__init__(*args, workers=workers, command=(CYDISPATCH,), **kwargs)

    def started_workers(self) -> dict[int, int | None]:
        """pid -> CPU for every worker that has logged its start."""
        return {int(m.group(1)): int(m.group(2)) if m.group(2) else None
                for m in self.find(STARTED)}

    def worker_pids(self) -> set[int]:
        """The primary's live child processes, read from /proc."""
        return children_of(self.pid)


@pytest.fixture
def start_server():
    """start_server(*args, workers=2) -> a ready Server, stopped at teardown."""
    servers: list[Server] = []

    def start(*args: str, workers: int = 2, ready: bool = True, **kwargs) -> Server:
        server = Server(*args, workers=workers, **kwargs)
        servers.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@contextlib.contextmanager
def serving(*args: str, workers: int = 2, **kwargs):
    """A ready Server for a `with` block (module fixtures), stopped at its end."""
    server = Server(*args, workers=workers, **kwargs)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dispatch_server():
    """One dispatch-mode server shared by a module's HTTP tests."""
    with serving() as server:
        yield server


APPS = str(Path(__file__).parent / "apps")
# What `--admin` logs once its endpoint listens: (host, port).
ADMIN_LINE = r"Admin endpoint on http://([\d.]+):(\d+) "


@contextlib.contextmanager
def app_server(events: Path, *args: str, workers: int = 2):
    """A server for one of tests/apps, whose app appends what it sees to `events`."""
    events.unlink(missing_ok=True)
    server = Server("--app-dir", APPS, *args, workers=workers,
                    env={"APP_EVENTS": str(events)})
    try:
        server.wait_ready()
        server.events = events
        yield server
    finally:
        server.stop()
        events.unlink(missing_ok=True)
