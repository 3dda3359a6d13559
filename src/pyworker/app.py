"""The built-in application: the seed's hello, and a CPU burner for benchmarks.

It is deliberately tiny, so that a benchmark measures the server and not a
framework.  A route answers (status, body); the HTTP layer does the rest.
"""

from __future__ import annotations

import os
import time

SLOW_MAX_MS = 1000
ROUTE_METHODS = frozenset((b"GET", b"HEAD"))


class HelloApp:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.hello = f"Hello from Worker {self.pid}".encode()
        self.routes = {b"/": self.index, b"/slow": self.slow}

    def __call__(self, method: bytes, target: bytes) -> tuple[int, bytes]:
        route = self.routes.get(target)     # most targets have no query
        query = b""
        if route is None:
            path, _, query = target.partition(b"?")
            route = self.routes.get(path)
            if route is None:
                return 404, b"Not Found\n"
        if method not in ROUTE_METHODS:
            return 405, b"Method Not Allowed\n"
        return route(query)

    def index(self, query: bytes) -> tuple[int, bytes]:
        return 200, self.hello

    def slow(self, query: bytes) -> tuple[int, bytes]:
        """Burn `ms` milliseconds of CPU (at most 1000): uneven work on demand."""
        ms = None
        for pair in query.split(b"&"):
            name, _, value = pair.partition(b"=")
            if name == b"ms":
                ms = value
        try:
            milliseconds = int(ms)
        except (TypeError, ValueError):
            milliseconds = -1
        if milliseconds < 0:
            return 400, b"/slow takes ms=N, a whole number of milliseconds\n"
        milliseconds = min(milliseconds, SLOW_MAX_MS)
        # CPU time, not wall time: the work is the same however loaded the
        # machine is, as real request handling would be.
        end = time.thread_time() + milliseconds / 1000
        while time.thread_time() < end:
            pass
        return 200, self.hello + f" after {milliseconds} ms of work".encode()
