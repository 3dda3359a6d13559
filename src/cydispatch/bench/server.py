"""A server under measurement: started as a subprocess, known by what it logs.

`cydispatch serve --port 0` picks a free port and says which in its first log
line; this module starts it (or the bare reference server), waits for that
line and for every worker to report, and stops it, whole process group
included.  The benchmark uses it, and so do the tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

RUNNING = re.compile(r"Primary (\d+) is running \((.*), (\d+) workers, (https?)://(.+)\)")
STARTED = re.compile(r"Worker (\d+) started (?:on CPU (\d+)|\(not pinned\))")
BARE_READY = re.compile(r"bare server ready http://(.+) \((\d+) workers\)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class ServerFailed(RuntimeError):
    """The server exited, or did not get ready in time; the message has its log."""


class ServerProcess:
    """A process started in its own session, its stderr collected line by line."""

    def __init__(self, argv: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, **(env or {})})
        self.pgid = self.proc.pid
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pid: int | None = None     # the primary (or bare parent) process
        self.scheme = "http"
        self.host = ""
        self.port = 0

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def output_ended(self) -> bool:
        """Every process that could write to the log (workers too) has closed it."""
        return not self._reader.is_alive()

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def find(self, pattern: str | re.Pattern) -> list[re.Match]:
        with self._lock:
            lines = list(self.lines)
        return [m for m in (re.search(pattern, line) for line in lines) if m]

    def wait_for_log(self, pattern, count: int = 1, timeout: float = 30.0) -> list[re.Match]:
        """The first `count` lines matching `pattern`, once they are logged."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(pattern)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                self._reader.join(1)
                found = self.find(pattern)
                if len(found) >= count:
                    return found
                raise ServerFailed(f"server exited ({self.proc.returncode}) before "
                                   f"logging {pattern!r}:\n{self.log}")
            if time.monotonic() >= deadline:
                raise ServerFailed(f"timed out after {timeout:g} s waiting for "
                                   f"{pattern!r} in the log:\n{self.log}")
            time.sleep(0.02)

    def _take_address(self, authority: str) -> None:
        host, _, port = authority.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; whatever is left of the group is killed after."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the whole group is gone already
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(5)
        if not self._reader.is_alive():
            self.proc.stderr.close()    # read to its end: nothing more will come

    # What /proc says about the primary

    def cpu_seconds(self) -> float:
        """User + system CPU time of the primary (or bare parent) so far."""
        return cpu_seconds(self.pid)

    def peak_rss_kb(self) -> int:
        """The primary's peak resident set size (VmHWM)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0


# The command, as this Python runs it; tests pass the installed console script.
CYDISPATCH = (sys.executable, "-m", "cydispatch.cli")


class CydispatchServer(ServerProcess):
    """`cydispatch serve --port 0 ARGS...`, ready once every worker has started."""

    def __init__(self, *args: str, workers: int = 2, env: dict | None = None,
                 wrapper: tuple[str, ...] = (),
                 command: tuple[str, ...] = CYDISPATCH) -> None:
        argv = [*wrapper, *command, "serve", "--port", "0",
                "--workers", str(workers), *args]
        super().__init__(argv, env)
        self.workers = workers

    def wait_ready(self, timeout: float = 30.0) -> CydispatchServer:
        running = self.wait_for_log(RUNNING, timeout=timeout)[0]
        self.pid = int(running.group(1))
        self.scheme = running.group(4)
        self._take_address(running.group(5))
        self.wait_for_log(STARTED, count=self.workers, timeout=timeout)
        return self


class BareServer(ServerProcess):
    """The bare uvloop + httptools reference server (cydispatch.bench.bare)."""

    def __init__(self, workers: int = 2, env: dict | None = None,
                 wrapper: tuple[str, ...] = ()) -> None:
        argv = [*wrapper, sys.executable, "-m", "cydispatch.bench.bare", "--port", "0",
                "--workers", str(workers)]
        super().__init__(argv, env)
        self.workers = workers

    def wait_ready(self, timeout: float = 30.0) -> BareServer:
        ready = self.wait_for_log(BARE_READY, timeout=timeout)[0]
        self.pid = self.proc.pid
        self._take_address(ready.group(1))
        return self
