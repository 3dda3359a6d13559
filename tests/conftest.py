"""Start the real `cydispatch` command and stop it, whatever the test did.

Each server runs in its own session (so its own process group); the finalizer
SIGKILLs the whole group after trying a clean stop, so no worker outlives a
test, even a failed one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from observe import children_of
from waiting import DEADLINE, wait_until

# The command installed next to this Python (a virtualenv), else on PATH.
CYDISPATCH = (shutil.which("cydispatch", path=os.path.dirname(sys.executable))
              or shutil.which("cydispatch"))
RUNNING = re.compile(r"Primary (\d+) is running \((.*), (\d+) workers, http://(.+)\)")
STARTED = re.compile(r"Worker (\d+) started (?:on CPU (\d+)|\(not pinned\))")


class Server:
    """A running `cydispatch serve` and what it has logged."""

    def __init__(self, *args: str, env: dict | None = None,
                 wrapper: tuple[str, ...] = ()) -> None:
        self.args = ("serve", "--port", "0", *args)
        self.proc = subprocess.Popen(
            [*wrapper, CYDISPATCH, *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, **(env or {})})
        self.pgid = self.proc.pid
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pid = self.host = self.port = None

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def find(self, pattern: str | re.Pattern) -> list[re.Match]:
        with self._lock:
            lines = list(self.lines)
        return [m for m in (re.search(pattern, line) for line in lines) if m]

    def wait_for_log(self, pattern, count: int = 1, timeout: float = DEADLINE):
        def enough():
            found = self.find(pattern)
            if self.proc.poll() is not None and len(found) < count:
                raise AssertionError(f"server exited ({self.proc.returncode}) "
                                     f"before logging {pattern!r}:\n{self.log}")
            return found if len(found) >= count else None
        return wait_until(enough, timeout, message=f"{pattern!r} in the log:\n{self.log}")

    def wait_ready(self, workers: int) -> "Server":
        running = self.wait_for_log(RUNNING)[0]
        self.pid = int(running.group(1))
        authority = running.group(4)
        host, _, port = authority.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.wait_for_log(STARTED, count=workers)
        return self

    def started_workers(self) -> dict[int, int | None]:
        """pid -> CPU for every worker that has logged its start."""
        return {int(m.group(1)): int(m.group(2)) if m.group(2) else None
                for m in self.find(STARTED)}

    def worker_pids(self) -> set[int]:
        """The primary's live child processes, read from /proc."""
        return children_of(self.pid)

    def stop(self, timeout: float = DEADLINE) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(5)


@pytest.fixture
def start_server():
    """start_server(*args, workers=2) -> a ready Server, stopped at teardown."""
    servers: list[Server] = []

    def start(*args: str, workers: int = 2, ready: bool = True, **kwargs) -> Server:
        server = Server("--workers", str(workers), *args, **kwargs)
        servers.append(server)
        if ready:
            server.wait_ready(workers)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def dispatch_server():
    """One dispatch-mode server shared by a module's HTTP tests."""
    server = Server("--workers", "2")
    try:
        server.wait_ready(2)
        yield server
    finally:
        server.stop()
