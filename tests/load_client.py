"""A small load client for the resilience tests: a new connection per request.

Threads send `GET path` with `Connection: close`, one request per connection,
and record what each got, classified as a user would see it:

- ok:        a complete 200 response (the worker pid is kept)
- refused:   the connection was refused (nothing listens any more)
- reset:     the connection was reset or closed before a single byte came back
- truncated: part of a response, then the connection ended
- error:     a complete response that is not 200, or no answer in time

Each outcome carries when its request was fully sent, so a test can tell the
requests sent before a signal from those sent after it.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass

PID = re.compile(rb"Hello from Worker (\d+)")
HEAD_END = b"\r\n\r\n"
LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


@dataclass
class Outcome:
    kind: str
    started: float          # before connect
    sent: float | None      # once the request was fully written; None if never
    pid: int | None = None
    detail: str = ""
    source: str | None = None   # the address the request came from, when bound
    body: bytes = b""           # of a 200 response


class LoadClient:
    def __init__(self, host: str, port: int, path: str = "/", threads: int = 4,
                 pause: float = 0.002, timeout: float = 30.0,
                 sources: tuple[str, ...] = ()) -> None:
        self.address = (host, port)
        # Thread i connects from sources[i % len(sources)]; the kernel picks without.
        self.sources = sources
        self.request = (f"GET {path} HTTP/1.1\r\nHost: test\r\n"
                        f"Connection: close\r\n\r\n").encode()
        self.pause = pause          # between requests: leave the server CPU
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self.in_flight: dict[int, float] = {}   # thread id -> started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True)
                         for index in range(threads)]

    def __enter__(self) -> LoadClient:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 60.0) -> list[Outcome]:
        """Send nothing new; wait for the requests under way to end."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), \
            "load client threads still waiting for answers"
        return self.results()

    def results(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def count(self, kind: str = "ok", since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.kind == kind and o.started >= since)

    def stuck(self, for_seconds: float) -> int:
        """Requests waiting for an answer for longer than `for_seconds`."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for started in self.in_flight.values()
                       if now - started > for_seconds)

    def _run(self, index: int) -> None:
        me = threading.get_ident()
        source = self.sources[index % len(self.sources)] if self.sources else None
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                self.in_flight[me] = started
            outcome = self._one(started, source)
            outcome.source = source
            with self._lock:
                del self.in_flight[me]
                self.outcomes.append(outcome)
            if outcome.kind == "refused":
                # Nothing listens: do not spin; the test decides what is next.
                self._stop.wait(0.05)
            elif self.pause:
                self._stop.wait(self.pause)

    def _one(self, started: float, source: str | None = None) -> Outcome:
        sent = None
        received = b""
        try:
            with socket.create_connection(self.address, timeout=self.timeout,
                                          source_address=(source, 0) if source else None
                                          ) as sock:
                sock.sendall(self.request)
                sent = time.monotonic()
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
        except ConnectionRefusedError:
            return Outcome("refused", started, sent)
        except (ConnectionResetError, BrokenPipeError) as exc:
            kind = "truncated" if received else "reset"
            return Outcome(kind, started, sent, detail=repr(exc))
        except OSError as exc:   # socket.timeout among them
            return Outcome("error", started, sent, detail=repr(exc))
        return self._classify(received, started, sent)

    @staticmethod
    def _classify(received: bytes, started: float, sent: float | None) -> Outcome:
        if not received:
            return Outcome("reset", started, sent, detail="closed without a byte")
        head, found, body = received.partition(HEAD_END)
        length = LENGTH.search(head + b"\r\n")
        if not found or length is None or len(body) < int(length.group(1)):
            return Outcome("truncated", started, sent, detail=repr(received[:80]))
        if not head.startswith(b"HTTP/1.1 200 "):
            return Outcome("error", started, sent, detail=repr(head[:80]))
        match = PID.match(body)
        return Outcome("ok", started, sent, pid=int(match.group(1)) if match else None,
                       body=body)


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.kind] = counts.get(outcome.kind, 0) + 1
    return counts


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.kind != "ok"]
