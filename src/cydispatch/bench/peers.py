"""Other servers, run on the same app in the same rounds: uvicorn, granian, gunicorn.

Each is started the way its users start it for production (its uvloop and
httptools options where it has them, no access log), with the same number of
workers, on a free port; it is ready once it answers `GET /`.

`node` is Node's cluster (node_cluster.js) serving the built-in app's routes:
the design cydispatch started from, for the built-in app only.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request

from cydispatch.bench.catalog import BUILTIN_APP_PEERS, PEERS
from cydispatch.bench.server import ServerFailed, ServerProcess

NODE_CLUSTER = os.path.join(os.path.dirname(__file__), "node_cluster.js")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(peer: str, app: str, interface: str, workers: int, port: int,
            threads: int) -> list[str]:
    """The command line that serves `app` with `peer`."""
    address = ["--host", "127.0.0.1", "--port", str(port)]
    if peer == "uvicorn":
        argv = [sys.executable, "-m", "uvicorn", app, *address, "--workers", str(workers),
                "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                "--log-level", "warning"]
        if interface == "wsgi":
            argv += ["--interface", "wsgi"]
        return argv
    if peer == "granian":
        argv = [shutil.which("granian") or "granian", "--interface", interface, *address,
                "--workers", str(workers), "--loop", "uvloop", "--http", "1", "--no-ws",
                "--log-level", "warning"]
        if interface == "wsgi":
            argv += ["--blocking-threads", str(threads)]
        return argv + [app]
    if peer == "gunicorn":
        argv = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
                "--workers", str(workers), "--log-level", "warning"]
        if interface == "asgi":
            argv += ["--worker-class", "uvicorn.workers.UvicornWorker"]
        else:
            argv += ["--worker-class", "gthread", "--threads", str(threads)]
        return argv + [app]
    if peer == "node":
        return [shutil.which("node") or "node", NODE_CLUSTER]
    raise ValueError(f"unknown peer {peer!r}")


def missing(peer: str) -> str | None:
    """Why `peer` cannot run here, or None."""
    if peer == "node":
        return None if shutil.which("node") else "node is not installed (Node.js)"
    module = {"uvicorn": "uvicorn", "granian": "granian", "gunicorn": "gunicorn"}[peer]
    try:
        __import__(module)
    except ImportError:
        return f"{peer} is not installed (pip install '.[bench]' installs the peers)"
    return None


class PeerServer(ServerProcess):
    """Another server on a free port, ready once it answers."""

    def __init__(self, peer: str, app: str, interface: str, workers: int, threads: int,
                 app_dir: str, wrapper: tuple[str, ...] = ()) -> None:
        port = free_port()
        argv = [*wrapper, *command(peer, app, interface, workers, port, threads)]
        env = {"PYTHONPATH": os.pathsep.join(filter(None, (os.path.abspath(app_dir),
                                                           os.environ.get("PYTHONPATH")))),
               "PORT": str(port), "WORKERS": str(workers)}
        super().__init__(argv, env)
        self.name = peer
        self.workers = workers
        self.host = "127.0.0.1"
        self.port = port

    def wait_ready(self, timeout: float = 60.0) -> PeerServer:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name} exited ({self.proc.returncode}):\n{self.log}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() >= deadline:
                raise ServerFailed(f"{self.name} did not answer within {timeout:g} s:\n"
                                   f"{self.log}")
            time.sleep(0.05)
        self.pid = self.proc.pid
        return self
