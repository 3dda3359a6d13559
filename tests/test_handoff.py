"""The Cython fd handoff on its own: a socketpair, no server."""

from __future__ import annotations

import os
import socket

import pytest

from cydispatch._dispatch import Dispatcher, WorkerChannel, WorkerState, send_fds
from waiting import wait_until


@pytest.fixture
def channel():
    primary, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield primary, WorkerChannel(worker.detach())
    primary.close()


def distinct_fds(count: int) -> list[int]:
    """`count` fds, each told apart by its inode (pipe ends)."""
    fds = []
    while len(fds) < count:
        fds.extend(os.pipe())
    if len(fds) > count:
        os.close(fds.pop())
    return fds


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino, os.fstat(fd).st_dev


def test_600_fds_arrive_complete_and_in_order(channel):
    primary, worker = channel
    sent = distinct_fds(600)
    identities = [inode(fd) for fd in sent]
    assert send_fds(primary.fileno(), sent) == 3     # 253 + 253 + 94
    for fd in sent:
        os.close(fd)                                 # in flight, the kernel holds them
    received, stop, closed = worker.receive()
    try:
        assert [inode(fd) for fd in received] == identities
        assert not stop and not closed
        assert worker.open_connections == 600
    finally:
        for fd in received:
            os.close(fd)
    # One acknowledgement per message: (handed, taken, state).
    acks = [primary.recv(64) for _ in range(3)]
    assert [int.from_bytes(ack[0:4], "little") for ack in acks] == [253, 253, 94]
    assert [int.from_bytes(ack[4:8], "little") for ack in acks] == [253, 253, 94]


@pytest.mark.parametrize("batch", [1, 64, 253])
def test_batch_size_sets_the_message_count(channel, batch):
    primary, worker = channel
    sent = distinct_fds(250)    # a channel holds about 278 messages, whatever their size
    assert send_fds(primary.fileno(), sent, batch=batch) == -(-250 // batch)
    received, _, _ = worker.receive()
    assert [inode(fd) for fd in received] == [inode(fd) for fd in sent]
    for fd in sent + received:
        os.close(fd)


def test_batch_size_is_bounded_by_the_kernel_limit(channel):
    primary, _ = channel
    with pytest.raises(ValueError):
        send_fds(primary.fileno(), [0], batch=254)


def test_closed_primary_is_reported(channel):
    primary, worker = channel
    primary.close()
    assert worker.receive() == ([], False, True)


def test_state_reports_reach_the_primary(channel):
    primary, worker = channel
    worker.report(WorkerState.WORKER_READY)
    report = primary.recv(64)
    assert int.from_bytes(report[8:12], "little") == WorkerState.WORKER_READY
    assert int.from_bytes(report[0:4], "little") == 0   # no handoff acknowledged


def test_heartbeats_keep_a_worker_from_looking_silent():
    primary, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    load_fd = os.memfd_create("load", os.MFD_CLOEXEC)
    os.ftruncate(load_fd, 4096)
    dispatcher = Dispatcher()
    dispatcher.attach(0, primary.detach(), load_fd)
    os.close(load_fd)
    worker = WorkerChannel(worker_end.detach())
    # Silence grows while the worker says nothing...
    wait_until(lambda: dispatcher.silence(0) >= 0.2, message="silence to grow")
    # ...and a heartbeat, read by the dispatcher's loop, resets it.
    worker.heartbeat()
    dispatcher.run(0)
    assert dispatcher.silence(0) < 0.2
    assert dispatcher.silence(5) == 0.0     # no worker there: never silent
    worker.close()
