"""Instructions a worker spends per new connection, counted by callgrind.

    python bench/connection_instructions.py [--mode dispatch|reuseport|shared] [APP]

Starts `cydispatch serve` with one worker under `valgrind --tool=callgrind
--trace-children=yes`, so the primary and the worker are each counted, and
makes N connections to it one after another, each a `Connection: close`
request whose answer must be a 200. It does this twice, with 300 and 1,300
connections, and prints the worker's and the primary's difference divided
by 1,000: what one more connection costs each, start-up excluded. So the
cost of a handed connection (dispatch) and of one the worker accepts itself
(reuseport) compare on the same app, in instructions, which do not move with
what else this shared machine is doing. Builds of the same code can still
differ by about 1,500 instructions (objects land at other addresses, and set
lookups of protocols collide differently): a change smaller than that needs
another measure. About a minute per mode. Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
RUNS = (300, 1300)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect_when_up(port: int, timeout: float = 120.0) -> None:
    """Wait until the server (slow under valgrind) accepts a connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"the server did not listen on port {port} within {timeout:.0f} s")
            time.sleep(0.5)


def make_connections(port: int, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(REQUEST)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        if not answer.startswith(b"HTTP/1.1 200 "):
            sys.exit(f"not a 200: {answer[:200]!r}")


def count(connections: int, args, out: Path) -> dict[str, int]:
    """Instructions of the primary and the worker over a run of `connections`."""
    port = free_port()
    command = ["valgrind", "--tool=callgrind", "--trace-children=yes",
               f"--callgrind-out-file={out}/callgrind.%p",
               sys.executable, "-m", "cydispatch.cli", "serve", "--mode", args.mode,
               "--workers", "1", "--port", str(port), "--log-level", "warning"]
    if args.app:
        command.append(args.app)
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": "0"})
    try:
        connect_when_up(port)
        make_connections(port, connections)
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=120)
    totals = {}
    for path in out.glob("callgrind.*"):
        found = re.search(r"^(?:summary|totals): (\d+)", path.read_text(errors="replace"), re.M)
        if found:
            totals[int(path.suffix[1:])] = int(found.group(1))
        path.unlink()
    if len(totals) != 2:
        sys.exit(f"expected a primary and a worker, got {len(totals)} profiles:\n{stderr[-2000:]}")
    primary, worker = sorted(totals)    # the worker is the primary's child
    return {"primary": totals[primary], "worker": totals[worker]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("app", nargs="?", help="module:app to serve (default: the built-in app)")
    parser.add_argument("--mode", choices=("dispatch", "reuseport", "shared"), default="dispatch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        fewer, more = (count(n, args, Path(scratch)) for n in RUNS)
    per = RUNS[1] - RUNS[0]
    what = args.app or "the built-in app"
    for process in ("worker", "primary"):
        print(f"{(more[process] - fewer[process]) / per:,.0f} instructions per connection "
              f"in the {process} ({args.mode}, {what})")


if __name__ == "__main__":
    main()
