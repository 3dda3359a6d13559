"""Microbenchmarks of the two hot paths: the fd handoff and a worker's request.

To measure:

    pytest -m microbench --benchmark-enable tests/test_microbench.py

In a normal test run (with --benchmark-disable) each runs once, as a test;
the results are checked either way.  The request benchmarks feed bytes to a
protocol in this process, with a stand-in transport: they time parsing, the
app and building the response, not the event loop or the socket.  The bare
reference server's protocol runs through the same harness, for comparison.
"""

from __future__ import annotations

import os
import socket

import pytest

from cydispatch._dispatch import WorkerChannel, send_fds, send_fds_each
from pyworker.app import HelloApp
from cydispatch.bench import bare
from pyworker.http import HttpProtocol, Responses

pytestmark = pytest.mark.microbench

FDS_PER_ROUND = 253     # one full message at the largest batch
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: wrk\r\n\r\n"
PIPELINED = 16
HELLO = b"Hello from Worker"


# The fd handoff

@pytest.fixture
def channel():
    """(primary end, WorkerChannel): a worker's channel, as the primary sees it."""
    primary, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker_channel = WorkerChannel(worker.detach())
    yield primary, worker_channel
    worker_channel.close()
    primary.close()


@pytest.fixture
def fds_to_hand():
    """FDS_PER_ROUND descriptors to hand over, created once: dups of a pipe end."""
    read_end, write_end = os.pipe()
    fds = [read_end] + [os.dup(read_end) for _ in range(FDS_PER_ROUND - 1)]
    yield fds
    for fd in fds + [write_end]:
        os.close(fd)


# "each": one message per fd, all in one sendmmsg, as the primary's loop sends
# them (a worker can then take them one at a time).
@pytest.mark.parametrize("batch", [1, 64, 253, "each"])
def test_fd_handoff(benchmark, channel, fds_to_hand, batch):
    primary, worker = channel

    def hand_over() -> tuple[int, int]:
        if batch == "each":
            calls = send_fds_each(primary.fileno(), fds_to_hand)
        else:
            calls = send_fds(primary.fileno(), fds_to_hand, batch=batch)
        received = worker.receive()[0]
        for fd in received:
            os.close(fd)
        return len(received), calls

    benchmark.extra_info["fds_per_round"] = FDS_PER_ROUND
    received, calls = benchmark(hand_over)
    assert received == FDS_PER_ROUND
    assert calls == (1 if batch == "each" else -(-FDS_PER_ROUND // batch))
    # Nothing comes back: a worker sends no acknowledgement.
    with pytest.raises(BlockingIOError):
        primary.recv(64, socket.MSG_DONTWAIT)


# A worker's request, parsed, answered and written

class StandInTransport:
    """What a protocol calls on its transport; keeps the last responses written."""

    def __init__(self) -> None:
        self.writes = 0
        self.last: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        if len(self.last) == PIPELINED:     # bounded: benchmarks write millions
            self.last.clear()
        self.last.append(data)

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class StandInWorker:
    """What HttpProtocol reads and calls on its `server`, the worker.

    What the real worker does per request in C (the busy stamps, the
    duration histogram) is the real WorkerChannel's, over a page of its own.
    """

    draining = False
    now = 0.0
    requests = 0
    responses = Responses()

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.primary_end = theirs
        self.channel = WorkerChannel(ours.detach())
        self.begin = self.channel.begin
        self.end = self.channel.end
        self.observe_since_begin = self.channel.observe_since_begin

    def connection_opened(self, protocol) -> None:
        pass

    def connection_closed(self, protocol) -> None:
        pass

    def dequeued(self, protocol) -> None:
        pass


class AddressedTransport(StandInTransport):
    """A stand-in transport with what an ASGI protocol also asks of one."""

    def get_extra_info(self, name):
        return ("127.0.0.1", 40000)

    def set_write_buffer_limits(self, high, low) -> None:
        pass


class LoopWorker(StandInWorker):
    """The stand-in worker, with what an ASGI protocol also asks of it: a loop, stamps, timing."""

    def __init__(self, loop) -> None:
        super().__init__()
        self.loop = loop
        self.stamped = self.channel.stamped
        self.observe = self.channel.observe


def serving(protocol, data: bytes):
    """A connected protocol, and a function feeding it `data`: how many responses."""
    transport = StandInTransport()
    protocol.connection_made(transport)

    def serve() -> int:
        before = transport.writes
        protocol.data_received(data)
        return transport.writes - before

    return transport, serve


def assert_hello_responses(transport: StandInTransport) -> None:
    assert transport.last and not transport.closing
    for response in transport.last:
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert HELLO in response


@pytest.mark.parametrize("requests", [1, PIPELINED], ids=["single", "pipelined16"])
def test_request_hot_path(benchmark, requests):
    transport, serve = serving(HttpProtocol(StandInWorker(), HelloApp()), REQUEST * requests)
    benchmark.extra_info["requests_per_round"] = requests
    assert benchmark(serve) == requests
    assert_hello_responses(transport)


def test_bare_request_hot_path(benchmark):
    transport, serve = serving(bare.BareProtocol(b"%s %d" % (HELLO, os.getpid())), REQUEST)
    benchmark.extra_info["requests_per_round"] = 1
    assert benchmark(serve) == 1
    assert_hello_responses(transport)
