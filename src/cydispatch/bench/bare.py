"""The bare reference server: uvloop + httptools and nothing else.

The project's target is a worker as fast as a hand-written uvloop + httptools
server; this is that server, so the benchmark can measure against it.  It is
shaped like cydispatch's `--mode reuseport`: one process per worker, each
pinned to a CPU, each with its own SO_REUSEPORT listener, so that comparing
the two measures the worker's HTTP layer and app.  It answers every request
with `Hello from Worker <pid>`, as the built-in app does, and has no routing,
no limits and no supervision: a worker that dies stops the whole server.

    python -m cydispatch.bench.bare --host H --port P --workers N [--no-pin]

Once every worker listens it prints `bare server ready http://H:P (N workers)`
on stderr; SIGTERM or SIGINT stops it with exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import os
import signal
import socket
import sys

import httptools
import uvloop

# cydispatch's default, so neither server drops connections the other keeps.
BACKLOG = 2048
EXIT_FAILED = 1
EXIT_USAGE = 2
# The parent handles these synchronously (sigwait), so they stay blocked in it.
PARENT_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}

STATUS_LINE = b"HTTP/1.1 200 OK\r\n"
CONTENT_TYPE = b"Content-Type: text/plain\r\nContent-Length: "
CONNECTION_CLOSE = b"Connection: close\r\n"


def http_date() -> bytes:
    return b"Date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"


# Refreshed once a second, as cydispatch's worker does: this keeps the two
# servers' responses comparable in size and in the work spent on them.
date_line = http_date()


def refresh_date(loop: asyncio.AbstractEventLoop) -> None:
    global date_line
    date_line = http_date()
    loop.call_later(1.0, refresh_date, loop)


class BareProtocol(asyncio.Protocol):
    """One connection: every complete request gets `hello`, in order."""

    def __init__(self, hello: bytes) -> None:
        self.hello = hello
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        # The parser refers back to this protocol: without this the pair
        # would wait for the cyclic collector, which a reference should not.
        self.parser = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:   # malformed, or an upgrade
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.transport.is_closing():     # pipelined after a Connection: close
            return
        keep_alive = self.parser.should_keep_alive()
        self.transport.write(b"".join((
            STATUS_LINE, date_line, CONTENT_TYPE, b"%d\r\n" % len(self.hello),
            b"" if keep_alive else CONNECTION_CLOSE, b"\r\n", self.hello,
        )))
        if not keep_alive:
            self.transport.close()


def serve(family: int, sockaddr: tuple, cpu: int | None, ready_fd: int) -> None:
    """A worker: listen on its own socket, say so on `ready_fd`, serve forever."""
    # Ctrl-C reaches the whole process group; the parent leads the stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENT_SIGNALS)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(sockaddr)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    hello = f"Hello from Worker {os.getpid()}".encode()
    loop.run_until_complete(loop.create_server(
        lambda: BareProtocol(hello), sock=sock, backlog=BACKLOG))
    refresh_date(loop)
    os.write(ready_fd, b".")
    os.close(ready_fd)
    loop.run_forever()


def start_workers(count: int, family: int, sockaddr: tuple, pin: bool,
                  probe: socket.socket) -> tuple[list[int], bool]:
    """Fork `count` workers; their pids, and whether every one is listening."""
    cpus = sorted(os.sched_getaffinity(0))
    # Each worker writes a byte here once it listens, then closes its end: an
    # end of file before `count` bytes means a worker died first.
    ready_read, ready_write = os.pipe()
    children = []
    for i in range(count):
        # fork, not spawn: the parent has no threads and no event loop, so
        # forking is safe, and readiness and exits stay plain fds and signals.
        pid = os.fork()
        if pid == 0:
            try:
                probe.close()
                os.close(ready_read)
                serve(family, sockaddr, cpus[i % len(cpus)] if pin else None, ready_write)
            except BaseException as exc:
                print(f"bare server: worker {os.getpid()} failed: {exc}", file=sys.stderr)
            finally:
                os._exit(EXIT_FAILED)
        children.append(pid)
    os.close(ready_write)
    ready = 0
    while ready < count and (chunk := os.read(ready_read, count)):
        ready += len(chunk)
    os.close(ready_read)
    return children, ready == count


def stop(children: list[int]) -> None:
    for pid in children:
        os.kill(pid, signal.SIGTERM)    # an unreaped child is still there to signal
    for pid in children:
        os.waitpid(pid, 0)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        # Without argparse's usage text: a bad argument is one line.
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m cydispatch.bench.bare",
                            description=__doc__.partition("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-pin", action="store_true", help="do not pin workers to CPUs")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = f"[{args.host}]" if ":" in args.host else args.host
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        # A socket in the SO_REUSEPORT group checks the address before any
        # worker starts and, for port 0, picks the port and holds it while the
        # workers run.  It never listens, so it is handed no connections.
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind(sockaddr)
    except OSError as exc:
        print(f"bare server: cannot listen on {host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    # Blocked before forking, so none is lost before the parent waits for it.
    signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
    children, ready = start_workers(args.workers, family, probe.getsockname(),
                                    not args.no_pin, probe)
    if not ready:
        stop(children)
        return EXIT_FAILED
    print(f"bare server ready http://{host}:{probe.getsockname()[1]} "
          f"({args.workers} workers)", file=sys.stderr, flush=True)
    while True:
        if signal.sigwait(PARENT_SIGNALS) != signal.SIGCHLD:
            stop(children)
            return 0
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:     # not a stop or continue: a worker is gone
            print(f"bare server: worker {pid} exited "
                  f"(code {os.waitstatus_to_exitcode(status)}); stopping",
                  file=sys.stderr, flush=True)
            children.remove(pid)
            stop(children)
            return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
