"""The Cython handoff on its own: the Dispatcher and WorkerChannel over real
socketpairs and a real TCP listener, in this process, no server.

A "worker" here is a WorkerChannel the test drives by hand; "dying" is
closing it, as the kernel does when a worker process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import gc
import os
import resource
import select
import signal
import socket
import sys
import time
import types
import warnings

import pytest
import uvloop

from cydispatch._dispatch import (
    Dispatcher, Event, HandedSocket, WorkerChannel, WorkerState, send_fds, step_adoption)
from pyworker import adoption
from cydispatch.settings import Settings
from pyworker.worker import Worker, load_direct_adoption
from waiting import wait_until, wait_until_async


# Fixtures: a listener, workers, clients

class Rig:
    """A Dispatcher on a loopback listener, with workers attached by hand."""

    def __init__(self, queue_depth: int = 2, max_conns: int = 1024,
                 slow_queue_depth: int = 0) -> None:
        listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        listener.setblocking(False)
        self.address = listener.getsockname()
        self.dispatcher = Dispatcher(listener.detach(), -1, "least-conn", max_conns,
                                     queue_depth, slow_queue_depth)
        self.workers: dict[int, WorkerChannel] = {}
        self.channel_copies: dict[int, int] = {}
        self.clients: list[socket.socket] = []

    def attach(self, slot: int, keep_channel_copy: bool = False) -> WorkerChannel:
        primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        load_fd = os.memfd_create("load", os.MFD_CLOEXEC)
        os.ftruncate(load_fd, 4096)
        if keep_channel_copy:
            self.channel_copies[slot] = os.dup(primary_end.fileno())
        # The dispatcher keeps a copy of the worker's end, as the supervisor
        # arranges: the worker process has the other.
        self.dispatcher.attach(slot, primary_end.detach(), load_fd,
                               os.dup(worker_end.fileno()))
        worker = WorkerChannel(worker_end.detach(), load_fd)
        os.close(load_fd)
        worker.report(WorkerState.WORKER_READY)
        wait_until(lambda: (Event.EVENT_READY, slot) in self.dispatcher.run(0),
                   message=f"worker {slot} to be ready")
        self.workers[slot] = worker
        return worker

    def connect(self, count: int) -> list[socket.socket]:
        """`count` clients, each with a request sent; in the listener's backlog."""
        made = []
        for _ in range(count):
            client = socket.create_connection(self.address)
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            made.append(client)
        self.clients.extend(made)
        return made

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for worker in self.workers.values():
            worker.close()
        for fd in self.channel_copies.values():
            os.close(fd)


@pytest.fixture
def rig():
    made: list[Rig] = []

    def make(**kwargs) -> Rig:
        made.append(Rig(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def peers_of(fds: list[int]) -> list[tuple]:
    """The client address of each received connection (and close it)."""
    addresses = []
    for fd in fds:
        with socket.socket(fileno=fd) as conn:
            addresses.append(conn.getpeername())
    return addresses


def addresses(clients: list[socket.socket]) -> list[tuple]:
    return [client.getsockname() for client in clients]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def limit_leaving(free: int) -> int:
    """A descriptor limit under which exactly `free` more fds can be opened.

    The limit bounds fd numbers, not their count: count the gaps below it.
    """
    used = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):     # the listing's own fd, closed now
            os.fstat(int(name))
            used.add(int(name))
    number = -1
    while free:
        number += 1
        if number not in used:
            free -= 1
    return number + 1


def hand_out(r: Rig, expected: int) -> None:
    """Run the dispatcher until `expected` connections have been accepted."""
    wait_until(lambda: r.dispatcher.run(0) is not None
               and r.dispatcher.accepted >= expected,
               message=f"{expected} connections accepted")


# The handoff itself

def test_the_primary_keeps_no_copy_of_a_handed_connection(rig):
    r = rig()
    worker = r.attach(0)
    before = open_fds()
    [client] = r.connect(1)
    hand_out(r, 1)
    # In flight, the connection is held by the channel, not by an fd here.
    assert open_fds() == before + 1     # the client's own socket
    assert r.dispatcher.load(0) == (1, 1, 1, 1)     # open, queued, in flight, handed
    [fd] = worker.receive()[0]
    assert r.dispatcher.load(0)[2] == 0
    # The worker's close is the last one: the client sees the end at once.
    assert os.read(fd, 64).startswith(b"GET / ")
    os.close(fd)
    worker.dequeue()
    worker.closed()
    client.settimeout(5)
    assert client.recv(1) == b""
    assert r.dispatcher.load(0)[:3] == (0, 0, 0)


def test_600_fds_arrive_complete_and_in_order():
    primary, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = WorkerChannel(worker_end.detach())
    sent = []
    while len(sent) < 600:
        sent.extend(os.pipe())
    identities = [os.fstat(fd).st_ino for fd in sent]
    try:
        assert send_fds(primary.fileno(), sent) == 3     # 253 + 253 + 94
        for fd in sent:
            os.close(fd)                                 # in flight, the kernel holds them
        received, stop, final, closed = worker.receive()
        assert [os.fstat(fd).st_ino for fd in received] == identities
        assert not stop and not final and not closed
        for fd in received:
            os.close(fd)
        # Nothing comes back: a worker acknowledges nothing.
        with pytest.raises(BlockingIOError):
            primary.recv(64, socket.MSG_DONTWAIT)
    finally:
        worker.close()
        primary.close()


def test_batch_size_is_bounded_by_the_kernel_limit():
    primary, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with primary, other, pytest.raises(ValueError):
        send_fds(primary.fileno(), [0], batch=254)


def test_closed_primary_is_reported():
    primary, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = WorkerChannel(worker_end.detach())
    primary.close()
    assert worker.receive() == ([], False, False, True)
    worker.close()


def test_state_reports_reach_the_primary():
    primary, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = WorkerChannel(worker_end.detach())
    worker.report(WorkerState.WORKER_READY)
    report = primary.recv(64)
    assert int.from_bytes(report[0:4], "little") == WorkerState.WORKER_READY
    assert int.from_bytes(report[4:8], "little") == 0   # nothing lost
    worker.close()
    primary.close()


def test_heartbeats_keep_a_worker_from_looking_silent(rig):
    r = rig()
    worker = r.attach(0)
    # Silence grows while the worker says nothing...
    wait_until(lambda: r.dispatcher.silence(0) >= 0.2, message="silence to grow")
    # ...and a heartbeat, read by the dispatcher's loop, resets it.
    worker.heartbeat()
    r.dispatcher.run(0)
    assert r.dispatcher.silence(0) < 0.2
    assert r.dispatcher.silence(5) == 0.0     # no worker there: never silent


def fill_with_heartbeats(worker: WorkerChannel) -> int:
    """Heartbeats until the primary's socket is full; how many went."""
    sent = 0
    while True:
        worker.heartbeat()
        if worker.backlogged:
            return sent
        sent += 1


def test_a_heartbeat_that_finds_the_socket_full_is_sent_later():
    primary, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = WorkerChannel(worker_end.detach())
    try:
        sent = fill_with_heartbeats(worker)
        # The primary's socket is full; the report waits, it is not dropped.
        assert not worker.flush()
        for _ in range(sent):
            primary.recv(64)
        assert worker.flush()
        assert not worker.backlogged
        assert len(primary.recv(64)) == 8
    finally:
        worker.close()
        primary.close()


def test_an_exiting_worker_waits_for_room_to_send_its_last_report():
    import threading
    from pyworker.worker import flush_reports
    primary, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = WorkerChannel(worker_end.detach())
    try:
        sent = fill_with_heartbeats(worker)
        # Nobody reads: it gives up at its deadline, and says so.
        assert not flush_reports(worker, 0.05)
        # The primary reads a moment later: the report goes then.
        reader = threading.Timer(0.1, lambda: [primary.recv(64) for _ in range(sent)])
        reader.start()
        assert flush_reports(worker, 30)
        reader.join()
        assert len(primary.recv(64)) == 8
    finally:
        worker.close()
        primary.close()



def test_a_worker_sends_a_report_that_found_the_socket_full_once_there_is_room():
    # The worker's own retry, on its real loop: nobody asks again, and a
    # healthy worker must not look silent to the watchdog meanwhile.
    loop = uvloop.new_event_loop()
    primary, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = WorkerChannel(worker_end.detach())
    worker = Worker.__new__(Worker)     # what reporting needs: no app, no primary
    worker.channel, worker.loop, worker.report_retrying = channel, loop, False
    try:
        sent = fill_with_heartbeats(channel)
        worker.report(WorkerState.WORKER_DRAINING)
        assert channel.backlogged and worker.report_retrying
        loop.run_until_complete(asyncio.sleep(0.05))
        assert channel.backlogged               # still no room: still waiting
        for _ in range(sent):
            primary.recv(64)                    # the primary reads again
        loop.run_until_complete(wait_until_async(
            lambda: not channel.backlogged, message="the report sent by the loop"))
        assert not worker.report_retrying
        last = primary.recv(64)
        assert int.from_bytes(last[:4], sys.byteorder) == WorkerState.WORKER_DRAINING
    finally:
        channel.close()
        primary.close()
        loop.close()



def test_a_worker_whose_primary_dies_while_a_report_waits_leaves_no_watcher_behind():
    # The channel turns readable (its end) and writable (room at last) in
    # one poll: the reader closes it, and the writer once ran on fd -1.
    loop = uvloop.new_event_loop()
    errors = []
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    primary, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = WorkerChannel(worker_end.detach())
    worker = Worker.__new__(Worker)     # what the channel's end needs: no app
    worker.__dict__.update(
        channel=channel, loop=loop, settings=Settings(), report_retrying=False,
        channel_watched=True, pull_due=False, nothing_follows=False, draining=False,
        started=True, shutdown=None, loop_stop_asked=False, server=None, connections=set(),
        handshakes=set())
    try:
        loop.add_reader(channel.fileno(), worker.on_channel_readable)
        fill_with_heartbeats(channel)
        worker.report(WorkerState.WORKER_READY)
        assert worker.report_retrying
        primary.close()                 # the primary dies
        loop.call_later(30, loop.stop)  # a deadline; exit_if_done stops it first
        loop.run_forever()
        assert worker.nothing_follows and channel.fileno() < 0
        assert not worker.report_retrying
        assert errors == []
    finally:
        channel.close()
        loop.close()



@pytest.mark.parametrize("slot", [-1, 0, 7])
def test_a_slot_that_does_not_exist_is_nobody_s(slot):
    # The module is compiled without bounds checks: each method that takes a
    # slot checks it, or -1 would read and write before the array (and with
    # no slot attached, through a NULL pointer).
    dispatcher = Dispatcher(-1, -1)
    assert dispatcher.load(slot) == (0, 0, 0, 0)
    assert dispatcher.lost(slot) == 0 and dispatcher.detach(slot) == 0
    assert dispatcher.silence(slot) == 0.0
    assert dispatcher.durations(slot)[1] == 0.0
    dispatcher.retire(slot)


# Nothing lost: workers that die, stall, run out of descriptors

def waiting_in_its_channel(r: Rig, slot: int, count: int) -> list[socket.socket]:
    """`count` clients, handed to the worker in `slot`, unread in its channel."""
    clients = r.connect(count)
    hand_out(r, count)
    assert r.dispatcher.load(slot)[2] == count
    return clients


def test_what_a_dead_worker_never_received_goes_to_another(rig):
    r = rig()
    doomed = r.attach(0)
    clients = waiting_in_its_channel(r, 0, 2)
    doomed.close()                          # it dies: its end closes
    assert r.dispatcher.detach(0) == 2
    heir = r.attach(1)
    r.dispatcher.run(0)
    received = heir.receive()[0]
    assert peers_of(received) == addresses(clients)
    assert r.dispatcher.redispatched == 2


def test_a_worker_that_dies_mid_batch_keeps_what_it_took(rig):
    r = rig(queue_depth=8)
    doomed = r.attach(0)
    first = r.connect(2)
    hand_out(r, 2)
    second = r.connect(3)
    hand_out(r, 5)
    # It takes the first two messages (a connection each), then dies.
    raw = socket.socket(fileno=os.dup(doomed.fileno()))
    taken = [fd for _ in range(2) for fd in socket.recv_fds(raw, 8, 253)[1]]
    raw.close()
    assert peers_of(taken) == addresses(first)  # and closed: they were its own
    doomed.close()
    assert r.dispatcher.detach(0) == 3
    heir = r.attach(1)
    r.dispatcher.run(0)
    received = heir.receive()[0]
    assert peers_of(received) == addresses(second)


def test_a_stuck_worker_gives_back_what_it_has_not_received(rig):
    r = rig()
    stuck = r.attach(0)
    clients = r.connect(2)
    hand_out(r, 2)
    assert r.dispatcher.load(0)[2] == 2
    stuck.begin()                           # enters a request and stays there
    entered = time.monotonic()
    wait_until(lambda: time.monotonic() - entered > 0.001,
               message="a millisecond in one request")
    free = r.attach(1)                      # its run() looks at the stuck one
    wait_until(lambda: r.dispatcher.run(0) is not None and r.dispatcher.reclaimed == 2,
               message="the stuck worker's connections taken back")
    received = free.receive()[0]
    assert peers_of(received) == addresses(clients)
    assert stuck.receive()[0] == []
    assert (stuck.open_connections, stuck.queued) == (0, 0)
    stuck.end()


def six_handed_to_each(r: Rig) -> tuple[WorkerChannel, WorkerChannel, list[int], list[int]]:
    """Two workers, 6 connections handed to each (queue depth 2).

    Slot 0's worker takes its --queue-depth in hand, 4 wait in its channel
    (so the primary never reads it as not reading its channel); slot 1's
    takes all six, and knows of slot 0.  Returns both and what each took.
    """
    first = r.attach(0)
    second = r.attach(1)
    r.connect(12)
    hand_out(r, 12)
    assert [r.dispatcher.load(slot)[2] for slot in (0, 1)] == [6, 6]
    in_hand = first.receive(within_hand=True)[0]
    assert len(in_hand) == 2
    taken = second.receive()[0]
    assert len(taken) == 6 and second.siblings == [0]
    return first, second, in_hand, taken


def stuck_with_handoffs_waiting(r: Rig) -> tuple[WorkerChannel, list[int]]:
    """Slot 0's worker stuck in a request, 4 handoffs waiting in its channel.

    Slot 1's worker has reached all but one of its own (room for one more
    in hand: not idle).  The test runs the dispatcher no more: only a
    sibling can move what waits.
    """
    stuck, free, in_hand, own = six_handed_to_each(r)
    peers_of(own)
    for _ in range(5):
        free.dequeue()
    assert not free.could_steal()           # busy, not stuck: left to itself
    stuck.begin()                           # enters a request and stays there
    wait_until(free.could_steal, message="the sibling seen as stuck")
    return stuck, in_hand


def steal_until_done(worker: WorkerChannel) -> list[int]:
    """Steal, reach what was taken (room in hand again), until nothing more comes."""
    taken = []
    while stolen := worker.steal():
        assert len(stolen) <= 2             # never more than its hand holds
        for _ in stolen:
            worker.dequeue()
        taken += stolen
    return taken


def test_workers_learn_of_each_other_once_both_serve(rig):
    r = rig()
    first = r.attach(0)
    assert first.receive()[0] == [] and first.siblings == []
    second = r.attach(1)
    second.receive()
    first.receive()
    assert (first.siblings, second.siblings) == ([1], [0])
    third = r.attach(2)
    third.receive()
    first.receive()
    assert (first.siblings, third.siblings) == ([1, 2], [0, 1])


def test_a_worker_takes_over_what_waits_for_a_sibling_stuck_in_a_slow_request(rig):
    r = rig(queue_depth=2)
    stuck = r.attach(0)
    free = r.attach(1)
    clients = r.connect(6)
    hand_out(r, 6)
    assert [r.dispatcher.load(slot)[2] for slot in (0, 1)] == [3, 3]
    taken_by_free = free.receive()[0]
    free.dequeue()
    free.dequeue()                          # one left in hand, room for one
    assert not free.could_steal()           # its sibling is not in a request
    stuck.begin()
    assert not free.could_steal()           # ...for long, yet
    wait_until(free.could_steal, message="the sibling seen as stuck")
    stolen = free.steal()
    assert len(stolen) == 1                 # no more than its hand holds
    free.dequeue()
    free.dequeue()                          # its hand empty: room for two
    stolen += free.steal()
    assert len(stolen) == 3
    assert not free.could_steal()           # nothing left to take
    assert stuck.receive()[0] == []         # each connection went one way
    assert (stuck.open_connections, stuck.queued) == (0, 0)
    assert (free.open_connections, free.queued) == (6, 2)   # it reached four
    assert r.dispatcher.load(0)[:3] == (0, 0, 0)
    assert r.dispatcher.stolen == free.stolen == 3
    assert sorted(peers_of(taken_by_free + stolen)) == sorted(addresses(clients))
    stuck.end()


def test_an_idle_worker_takes_half_of_what_waits_for_a_busy_sibling(rig):
    # Not stuck, only behind: with nothing in hand and its own channel
    # empty, a worker would sleep while connections wait for its sibling.
    r = rig(queue_depth=2)
    busy, idle, in_hand, own = six_handed_to_each(r)  # 4 wait for the busy one
    assert not idle.could_steal()           # it has six of its own in hand
    for _ in own:
        idle.dequeue()
    assert idle.could_steal()               # now it has none
    taken = idle.steal()
    assert len(taken) == 2 and r.dispatcher.load(0)[2] == 2
    assert (busy.open_connections, busy.queued) == (4, 4)
    for _ in taken:
        idle.dequeue()
    assert idle.could_steal()               # of the two left, it takes one
    taken += idle.steal()
    assert len(taken) == 3 and r.dispatcher.load(0)[2] == 1
    for _ in taken[2:]:
        idle.dequeue()
    assert not idle.could_steal()           # the last is the sibling's
    rest = busy.receive()[0]
    assert len(rest) == 1
    assert sorted(peers_of(in_hand + own + taken + rest)) == sorted(addresses(r.clients))


def test_a_worker_at_max_conns_takes_nothing_from_its_siblings(rig):
    # --max-conns 6: a worker holding six takes no more, stolen or handed.
    r = rig(queue_depth=2, max_conns=6)
    busy, full, in_hand, held = six_handed_to_each(r)
    for _ in held:
        full.dequeue()                      # idle, but six open
    assert not full.could_steal() and full.steal() == []
    os.close(held.pop())                    # one closes
    full.closed()
    assert full.could_steal()
    taken = full.steal()
    assert len(taken) == 1 and full.open_connections == 6
    peers_of(in_hand + held + taken + busy.receive()[0])


def test_a_stuck_sibling_is_left_alone_while_a_stop_is_on_its_way(rig):
    # The primary closes the gate before it sends a command: a sibling
    # must never take the stop (or nothing-follows) meant for the worker.
    r = rig()
    stuck, in_hand = stuck_with_handoffs_waiting(r)
    free = r.workers[1]
    r.dispatcher.retire(0)
    assert not free.could_steal() and free.steal() == []
    fds, stop, final, _ = stuck.receive()
    assert len(fds) == 4 and stop and final
    peers_of(in_hand + fds)
    stuck.end()


def test_an_introduction_a_sibling_takes_is_sent_again(rig):
    # A third worker starts serving while the stuck one has handoffs
    # waiting: the introduction is queued behind them, and a sibling taking
    # them takes it too.  The primary sends it to the stuck one again.
    r = rig()
    stuck, in_hand = stuck_with_handoffs_waiting(r)
    free = r.workers[1]
    stuck.end()         # out of its request while the third one starts...
    r.attach(2)
    stuck.begin()       # ...and in a slow one again
    wait_until(free.could_steal, message="the sibling seen as stuck")
    free.receive()
    assert free.siblings == [0, 2]
    assert len(steal_until_done(free)) == 4
    r.dispatcher.run(0)
    stuck.end()
    assert stuck.receive()[0] == []
    assert stuck.siblings == [1, 2]
    peers_of(in_hand)


def test_a_take_back_keeps_the_introductions_it_finds(rig):
    # The primary takes back what waits for a stuck worker; an introduction
    # found among the handoffs goes back to the worker, not into the void.
    r = rig()
    stuck = r.attach(0)
    r.connect(2)
    hand_out(r, 2)
    stuck.begin()
    r.attach(1)         # introduced to the stuck one, behind its handoffs
    wait_until(lambda: r.dispatcher.run(0) is not None and r.dispatcher.reclaimed == 2,
               message="the stuck worker's connections taken back")
    r.dispatcher.run(0)     # its loop turns again: the introduction goes back
    stuck.end()
    assert stuck.receive()[0] == []
    assert stuck.siblings == [1]


def test_a_dead_siblings_channel_is_left_to_the_primary(rig):
    r = rig()
    stuck, in_hand = stuck_with_handoffs_waiting(r)
    free = r.workers[1]
    stuck.close()                           # dies inside its request
    assert r.dispatcher.detach(0) == 4      # taken back by the primary
    assert not free.could_steal() and free.steal() == []
    peers_of(in_hand)


def held_load_pages() -> int:
    with open("/proc/self/maps") as maps:
        return sum("memfd:load" in line for line in maps)


def test_a_sibling_that_has_gone_is_let_go(rig):
    # Each worker keeps a sibling's channel end and load page, and counts the
    # descriptor out of the room it says it has.  Once the sibling has gone
    # the others let both go and count the descriptor back: a server that
    # scales down (TTOU) must not leave them held in every worker.
    r = rig()
    workers = [r.attach(slot) for slot in range(3)]
    for worker in workers:
        worker.set_fd_room(100)
    for worker in workers + workers:
        worker.receive()
    assert [w.siblings for w in workers] == [[1, 2], [0, 2], [0, 1]]
    assert [w.fd_room for w in workers] == [98, 98, 98]
    first, gone, third = workers
    gone.close()
    assert r.dispatcher.detach(1) == 0
    descriptors, pages = len(os.listdir("/proc/self/fd")), held_load_pages()
    first.receive()
    third.receive()
    assert (first.siblings, third.siblings) == ([2], [0])
    assert (first.fd_room, third.fd_room) == (99, 99)
    # One channel end and one page less in each of the two (all in this process).
    assert len(os.listdir("/proc/self/fd")) == descriptors - 2
    assert held_load_pages() == pages - 2
    # The slot taken again: introduced anew, counted out again.
    workers[1] = r.attach(1)
    workers[1].receive()
    first.receive()
    assert first.siblings == [1, 2] and first.fd_room == 98


def test_a_worker_takes_in_hand_no_more_than_the_queue_depth(rig):
    # The primary queues up to 4x --queue-depth for a worker, one message
    # per connection; the worker takes --queue-depth of them at a time, so
    # the rest stays where it can be taken back.
    r = rig(queue_depth=2)
    worker = r.attach(0)
    clients = r.connect(10)
    hand_out(r, 8)
    assert r.dispatcher.accepted == 8       # 4x the depth; 2 wait in the backlog
    first = worker.receive(within_hand=True)[0]
    assert len(first) == 2 and worker.hand_full
    assert worker.receive(within_hand=True)[0] == []
    assert r.dispatcher.load(0)[2] == 6     # still in its channel
    worker.dequeue()                        # it reaches one of them
    assert not worker.hand_full
    second = worker.receive(within_hand=True)[0]
    assert len(second) == 1 and worker.hand_full
    assert peers_of(first + second) == addresses(clients[:3])   # in order


def test_the_depth_is_the_slow_one_while_a_request_is_slow(rig):
    # Workers that share a CPU are handed deeper batches; but what one holds
    # waits behind its slow request, so while one is seen the primary hands
    # with the slow depth, and goes back to the full one a second after.
    r = rig(queue_depth=4, slow_queue_depth=2)
    slow = r.attach(0)
    free = r.attach(1)
    r.connect(2)
    hand_out(r, 2)
    assert r.dispatcher.queue_depth == 4
    held = slow.receive(within_hand=True)[0] + free.receive(within_hand=True)[0]
    slow.begin()                            # enters a request and stays there
    entered = time.monotonic()
    wait_until(lambda: time.monotonic() - entered > 0.016,
               message="16 ms in one request: slow work, not a wait for the CPU")
    assert r.dispatcher.slow_spells == 0 and r.dispatcher.slow_seconds == 0
    before_switch = time.monotonic()
    r.connect(8)
    hand_out(r, 10)
    assert r.dispatcher.queue_depth == 2
    assert r.dispatcher.slow_spells == 1
    # The free worker had one in hand: one more now, not three.
    held += free.receive(within_hand=True)[0]
    assert len(held) == 3 and free.hand_full
    slow.end()
    ended = time.monotonic()
    for _ in range(2):                      # it reaches both of its own
        free.dequeue()
    slow.dequeue()
    r.dispatcher.run(0)
    assert r.dispatcher.queue_depth == 2    # remembered for a second
    held += free.receive(within_hand=True)[0]
    assert len(held) == 5 and free.hand_full    # 2 in hand, 5 in its channel
    wait_until(lambda: time.monotonic() - ended > 1.0, message="a second without one")
    # What the next handoff will find, before one comes to switch.
    assert r.dispatcher.queue_depth == 4
    r.dispatcher.run(0)
    assert r.dispatcher.queue_depth == 4
    # One spell: from the first slow sighting to a second after the last.
    assert r.dispatcher.slow_spells == 1
    assert 1.0 <= r.dispatcher.slow_seconds < time.monotonic() - before_switch
    held += free.receive(within_hand=True)[0]
    assert len(held) == 7 and free.hand_full    # 4 in hand now
    peers_of(held)


def test_a_slow_request_after_a_quiet_second_starts_a_new_spell(rig):
    # No handoff came to switch the depth back after the first spell's
    # second: it ended then all the same, and the next slow request starts
    # another.
    r = rig(queue_depth=4, slow_queue_depth=2)
    slow = r.attach(0)
    free = r.attach(1)
    slow.begin()
    entered = time.monotonic()
    wait_until(lambda: time.monotonic() - entered > 0.016, message="16 ms in one request")
    started = time.monotonic()
    r.connect(2)
    hand_out(r, 2)
    held = free.receive(within_hand=True)[0]
    assert r.dispatcher.slow_spells == 1
    slow.end()
    ended = time.monotonic()
    wait_until(lambda: time.monotonic() - ended > 1.0, message="a quiet second")
    slow.begin()
    entered = time.monotonic()
    wait_until(lambda: time.monotonic() - entered > 0.016, message="16 ms in one request")
    r.connect(2)
    hand_out(r, 4)
    assert r.dispatcher.queue_depth == 2 and r.dispatcher.slow_spells == 2
    # The first spell's second, and the new one's few milliseconds so far.
    assert 1.0 <= r.dispatcher.slow_seconds < time.monotonic() - started
    slow.end()
    peers_of(held)


def test_one_depth_stays_with_a_slow_request(rig):
    # --queue-depth given: it is the depth whatever the requests take.
    r = rig(queue_depth=4)
    slow = r.attach(0)
    r.attach(1)
    slow.begin()
    entered = time.monotonic()
    wait_until(lambda: time.monotonic() - entered > 0.016, message="16 ms in one request")
    r.connect(2)
    hand_out(r, 2)
    assert r.dispatcher.queue_depth == 4
    slow.end()


def test_a_worker_wakes_the_primary_once_its_queue_is_down_to_half(rig):
    # The primary waits for room with 8 queued for this worker and 4 more in
    # the backlog.  The worker says so (a report, which wakes the primary)
    # only once its queue is down to 4: one wake-up and a batch handed, not
    # one of each per connection.
    r = rig(queue_depth=2)
    worker = r.attach(0, keep_channel_copy=True)
    primary_end = socket.socket(fileno=os.dup(r.channel_copies[0]))
    clients = r.connect(12)
    hand_out(r, 8)
    for _ in range(10):
        r.dispatcher.run(0)
    assert r.dispatcher.accepted == 8       # and the primary asked for a nudge

    def report_sent() -> bool:
        try:
            return bool(primary_end.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False

    taken = []
    for queued in (7, 6, 5):
        taken += worker.receive(within_hand=True)[0]
        worker.dequeue()
        assert worker.queued == queued
        assert not report_sent(), f"the worker woke the primary with {queued} queued"
    taken += worker.receive(within_hand=True)[0]
    worker.dequeue()
    assert worker.queued == 4 and report_sent()
    primary_end.close()
    hand_out(r, 12)
    assert r.dispatcher.load(0)[1] == 8     # queued again, in one batch
    while len(taken) < 12:
        worker.dequeue()
        taken += worker.receive(within_hand=True)[0]
    assert peers_of(taken) == addresses(clients)


def test_a_stuck_worker_gives_back_what_it_holds_in_its_channel(rig):
    r = rig(queue_depth=1)
    stuck = r.attach(0)
    clients = r.connect(4)
    hand_out(r, 4)
    [reached] = stuck.receive(within_hand=True)[0]
    stuck.dequeue()
    stuck.begin()                           # ...and its request is slow
    entered = time.monotonic()
    wait_until(lambda: time.monotonic() - entered > 0.001,
               message="a millisecond in one request")
    free = r.attach(1)
    wait_until(lambda: r.dispatcher.run(0) is not None and r.dispatcher.reclaimed == 3,
               message="what waits in its channel taken back")
    assert peers_of(free.receive()[0]) == addresses(clients[1:])
    assert peers_of([reached]) == addresses(clients[:1])
    stuck.end()


def test_what_waits_for_a_full_thread_pool_moves_only_to_a_worker_that_can_start_it(rig):
    # A WSGI worker with every thread busy is handed nothing new.  What waits
    # in its channel goes to a worker with a thread free; with every pool
    # full it stays, to start once a thread of its own is free: taken back,
    # it would go to the first pool with one, no sooner, and back again.
    for _ in range(5):
        r = rig(queue_depth=1)
        pool = r.attach(0)
        other = r.attach(1)
        clients = r.connect(4)
        hand_out(r, 4)
        [reached] = pool.receive(within_hand=True)[0]
        pool.dequeue()
        [own] = other.receive(within_hand=True)[0]
        other.dequeue()                     # room in hand; one waits in each channel
        pool.hold_busy(True)
        filled = time.monotonic()
        while time.monotonic() - filled < 0.002:
            pass                # full past STUCK_MICROSECONDS; wait_until's polls are coarser
        other.hold_busy(True)   # just full: not stuck yet, and no freer
        r.dispatcher.run(0)
        kept = r.dispatcher.reclaimed == 0
        # Its own pool full, a worker takes nothing from a sibling's channel.
        took = other.could_steal()
        if time.monotonic() - filled < 0.012:
            break
        # This process waited for a CPU as long as slow work takes: the pools
        # may rightly read as slow.  Again, on a fresh rig.
    assert kept and not took
    other.hold_busy(False)                  # a thread of its own is free
    [second] = other.receive(within_hand=True)[0]
    other.dequeue()
    wait_until(lambda: r.dispatcher.run(0) is not None and r.dispatcher.reclaimed == 1,
               message="what waits for the full pool taken back for the free one")
    moved = other.receive(within_hand=True)[0]
    assert len(moved) == 1 and r.dispatcher.redispatched == 1
    pool.hold_busy(False)
    assert pool.receive()[0] == []
    assert sorted(peers_of([reached, own, second] + moved)) == sorted(addresses(clients))


def test_a_worker_that_reads_nothing_gives_back_what_waits_in_its_channel(rig):
    # Frozen (SIGSTOP, swapped out) with room in hand: it is not in a
    # request, so only its untouched channel tells.
    r = rig()
    frozen = r.attach(0)
    clients = r.connect(3)
    hand_out(r, 3)
    free = r.attach(1)
    wait_until(lambda: r.dispatcher.run(0) is not None and r.dispatcher.reclaimed == 3,
               message="what waits in the frozen worker's channel taken back")
    assert peers_of(free.receive()[0]) == addresses(clients)
    assert frozen.receive()[0] == []
    assert (frozen.open_connections, frozen.queued) == (0, 0)


def test_a_worker_that_was_only_slow_to_run_is_woken_to_report_after_a_take_back(rig):
    # Descheduled for a few milliseconds, the worker found its channel
    # readable; by the time it ran, the primary had taken everything back.
    # Nothing on its channel would wake it again before its next heartbeat.
    r = rig()
    slow = r.attach(0)
    clients = r.connect(3)
    hand_out(r, 3)
    wait_until(lambda: r.dispatcher.run(0) is not None and r.dispatcher.reclaimed == 3,
               message="what waits in the slow worker's channel taken back")
    readable, _, _ = select.select([slow.fileno()], [], [], 5)
    assert readable, "the worker's channel stays silent: it would sleep until its heartbeat"
    assert slow.receive(within_hand=True)[0] == []  # reading it sends the report
    given_back = []
    wait_until(lambda: r.dispatcher.run(0) is not None
               and given_back.extend(slow.receive()[0]) is None and len(given_back) == 3,
               message="the taken-back connections handed to it again")
    assert sorted(peers_of(given_back)) == sorted(addresses(clients))


def test_a_full_channel_sends_connections_elsewhere(rig):
    r = rig()
    blocked = r.attach(0, keep_channel_copy=True)
    # Something fills its channel (it stopped reading long ago).
    copy = socket.socket(fileno=os.dup(r.channel_copies[0]))
    while True:
        try:
            copy.send(b"\0" * 8, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    copy.close()
    free = r.attach(1)
    clients = r.connect(6)
    received = []

    def all_at_the_free_worker() -> bool:
        r.dispatcher.run(0)
        fds = free.receive()[0]
        for _ in fds:
            free.dequeue()      # answered: room in its queue for the next
        received.extend(fds)
        return len(received) == 6

    wait_until(all_at_the_free_worker, message="six connections at the free worker")
    assert sorted(peers_of(received)) == sorted(addresses(clients))
    assert blocked.open_connections == 0


@contextlib.contextmanager
def descriptor_limit(soft: int):
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_stop_out_of_descriptors_hands_out_the_whole_backlog(rig):
    r = rig()
    first, second = r.attach(0), r.attach(1)
    clients = r.connect(100)
    # Room for 8 more descriptors: the dispatcher must send (and so close)
    # what it accepted before it can accept more.
    with descriptor_limit(limit_leaving(8)):
        taken = r.dispatcher.close_listener()
    assert taken == 100
    assert not r.dispatcher.listening
    received = first.receive()[0] + second.receive()[0]
    assert sorted(peers_of(received)) == sorted(addresses(clients))


def test_during_a_stop_a_dead_workers_connections_go_to_one_still_finishing(rig):
    r = rig()
    doomed = r.attach(1)
    clients = waiting_in_its_channel(r, 1, 2)
    finisher = r.attach(0)
    r.dispatcher.close_listener()
    r.dispatcher.retire(0)                  # both told to finish and exit
    r.dispatcher.retire(1)
    doomed.close()                          # and this one dies first
    assert r.dispatcher.detach(1) == 2
    r.dispatcher.run(0)
    received, stop, final, closed = finisher.receive()
    assert stop and final and not closed
    # Nobody else is left to serve them: the finishing worker does.
    assert peers_of(received) == addresses(clients)
    assert r.dispatcher.redispatched == 2 and r.dispatcher.orphans == 0


def test_a_worker_out_of_descriptors_reports_what_the_kernel_closed(rig):
    r = rig(queue_depth=50)
    worker = r.attach(0)
    r.connect(20)
    hand_out(r, 20)
    # Room for 5: the kernel installs five and closes the other fifteen.
    with descriptor_limit(limit_leaving(5)):
        received = worker.receive()[0]
    assert len(received) == 5
    assert worker.lost == 15
    assert (worker.open_connections, worker.queued) == (5, 5)
    events = []
    wait_until(lambda: events.extend(r.dispatcher.run(0)) is None
               and (Event.EVENT_WORKER_FULL, 0) in events,
               message="the primary to hear of it")
    assert r.dispatcher.lost(0) == 15
    for fd in received:
        os.close(fd)


def test_the_primary_hands_a_worker_no_more_than_it_has_descriptors_for(rig):
    r = rig(queue_depth=50)
    worker = r.attach(0)
    worker.set_fd_room(3)
    r.connect(5)
    events = []
    wait_until(lambda: events.extend(r.dispatcher.run(0)) is None
               and r.dispatcher.accepted == 3, message="three handed")
    assert (Event.EVENT_WORKER_FULL, 0) in events
    for _ in range(20):
        r.dispatcher.run(0)
    assert r.dispatcher.accepted == 3       # the other two wait in the backlog
    received = worker.receive()[0]
    os.close(received[0])
    worker.dequeue()
    worker.closed()                         # room for one more
    wait_until(lambda: r.dispatcher.run(0) is not None and r.dispatcher.accepted == 4,
               message="a fourth handed once one closed")
    for fd in received[1:]:
        os.close(fd)


def test_a_full_worker_is_warned_of_once_when_its_handoffs_come_and_go(rig):
    # Full, then frozen: what waits in its channel is taken back and its
    # count falls to nothing, then handed to it again once it reads.  It is
    # the same shortage, not a new one: the operator hears of it once.
    r = rig(queue_depth=50)
    worker = r.attach(0)
    worker.set_fd_room(4)
    clients = r.connect(4)
    events = []
    wait_until(lambda: events.extend(r.dispatcher.run(0)) is None
               and r.dispatcher.reclaimed == 4,
               message="what waits in the frozen worker's channel taken back")
    assert worker.receive(within_hand=True)[0] == []    # it reads: the report
    given_back = []
    wait_until(lambda: events.extend(r.dispatcher.run(0)) is None
               and given_back.extend(worker.receive()[0]) is None and len(given_back) == 4,
               message="the taken-back connections handed to it again")
    assert sorted(peers_of(given_back)) == sorted(addresses(clients))
    assert events.count((Event.EVENT_WORKER_FULL, 0)) == 1


# Signals

def test_every_delivered_signal_is_an_event():
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    dispatcher = Dispatcher(-1, wake_r)
    try:
        # What Python's C handler writes: one byte per delivery.  Its Python
        # handler may run once for both; the bytes still count two.
        os.write(wake_w, bytes([signal.SIGTTIN, signal.SIGTTIN]))
        assert dispatcher.run(0) == [(Event.EVENT_SIGNAL, signal.SIGTTIN)] * 2
        assert dispatcher.run(0) == []
    finally:
        del dispatcher
        os.close(wake_r)
        os.close(wake_w)


def test_a_signal_wakes_a_waiting_dispatcher():
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    old_handler = signal.signal(signal.SIGUSR1, lambda *args: None)
    dispatcher = Dispatcher(-1, wake_r)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert select.select([wake_r], [], [], 5)[0]
        assert dispatcher.run(5) == [(Event.EVENT_SIGNAL, signal.SIGUSR1)]
    finally:
        signal.signal(signal.SIGUSR1, old_handler)
        signal.set_wakeup_fd(old_fd)
        del dispatcher
        os.close(wake_r)
        os.close(wake_w)


# The worker's adoption of a handed fd: straight into uvloop, as uvloop's own
# accept does (pyworker.adoption), or, with TLS or another uvloop than the one
# cydispatch was built against, uvloop's connect_accepted_socket stepped by
# hand (Worker.adopt_all) with step_adoption and one HandedSocket.

class Recorder(asyncio.Protocol):
    """A protocol that is its own factory and keeps what reaches it."""

    def __init__(self) -> None:
        self.transport = None
        self.received = b""

    def __call__(self):
        return self

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def assert_the_transport_owns(fd: int, loop, protocol, client: socket.socket) -> None:
    """Closing `protocol`'s transport closes the connection and `fd`."""
    protocol.transport.close()
    loop.run_until_complete(asyncio.sleep(0))
    assert client.recv(1) == b""
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_handed_connection_is_adopted_in_one_call(loop):
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname(), timeout=5) as client:
        accepted, _ = listener.accept()
        fd = accepted.detach()
        protocol = Recorder()
        assert adoption.adopt_tcp(loop, protocol, fd, contextvars.copy_context()) is None
        # As after uvloop's own accept: connection_made is the loop's next turn.
        assert protocol.transport is None
        client.sendall(b"hello")
        loop.run_until_complete(wait_until_async(lambda: protocol.received == b"hello",
                                                 message="the client's bytes"))
        assert protocol.transport.get_extra_info("peername") == client.getsockname()
        assert_the_transport_owns(fd, loop, protocol, client)


def test_an_fd_uvloop_cannot_adopt_directly_raises_and_stays_the_callers(loop):
    read_end, write_end = os.pipe()
    try:
        protocol = Recorder()
        gc.collect()    # what earlier tests left is not this test's to judge
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(OSError) as raised:
                adoption.adopt_tcp(loop, protocol, read_end, contextvars.copy_context())
            loop.run_until_complete(asyncio.sleep(0))   # the handle's close completes
        assert raised.value.errno == errno.ENOTSOCK
        assert protocol.transport is None
        os.fstat(read_end)      # not closed behind the caller's back
        # The transport made for it was closed, not left for its finaliser
        # (which warns as soon as the failed call drops it).
        assert [str(w.message) for w in caught if "TCPTransport" in str(w.message)] == []
    finally:
        os.close(read_end)
        os.close(write_end)


def test_direct_adoption_is_used_with_the_uvloop_it_was_built_against():
    # A build that silently fell back would serve, only slower: this says so.
    assert adoption.BUILT_FOR_UVLOOP == uvloop.__version__
    assert load_direct_adoption() is adoption.adopt_tcp


def test_direct_adoption_is_not_used_with_another_uvloop(monkeypatch, caplog):
    monkeypatch.setattr(uvloop, "__version__", "0.0.1")
    assert load_direct_adoption() is None
    assert (f"built against uvloop {adoption.BUILT_FOR_UVLOOP}, and uvloop 0.0.1 is "
            "installed") in caplog.text


def size_changed():
    warnings.warn("uvloop.loop.UVStream size changed, may indicate binary incompatibility. "
                  "Expected 392 from C header, got 400 from PyObject", RuntimeWarning)


def type_too_small():
    raise ValueError("uvloop.loop.UVStream size changed, may indicate binary "
                     "incompatibility. Expected 400 from C header, got 392 from PyObject")


def not_built():
    raise ModuleNotFoundError("No module named 'pyworker.adoption'")


@pytest.mark.parametrize("failing_import", [size_changed, type_too_small, not_built])
def test_direct_adoption_is_not_used_when_its_module_does_not_fit(failing_import, caplog):
    # What Cython's import of a module compiled against another uvloop does:
    # a warning for a type grown larger, an exception for one grown smaller.
    assert load_direct_adoption(lambda name: failing_import()) is None
    assert "pyworker.adoption cannot be used with uvloop" in caplog.text


def test_a_handed_connection_is_adopted_in_two_steps(loop):
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname(), timeout=5) as client:
        accepted, _ = listener.accept()
        fd = accepted.detach()
        handed = HandedSocket(fd, socket.AF_INET)
        protocol, failures = Recorder(), []
        coroutine = loop.connect_accepted_socket(protocol, handed)

        waiter = step_adoption(coroutine, fd, protocol, lambda *failure: failures.append(failure))
        # The transport exists; connection_made is the loop's next turn.
        assert isinstance(waiter, asyncio.Future) and not waiter.done()
        client.sendall(b"hello")
        loop.run_until_complete(asyncio.sleep(0))
        assert waiter.done()
        assert step_adoption(coroutine, fd, protocol,
                             lambda *failure: failures.append(failure)) is None  # ended
        loop.run_until_complete(wait_until_async(lambda: protocol.received == b"hello",
                                                 message="the client's bytes"))
        assert failures == []
        assert_the_transport_owns(fd, loop, protocol, client)


def test_an_fd_uvloop_cannot_adopt_goes_to_the_failure_callback(loop):
    read_end, write_end = os.pipe()
    try:
        protocol, failures = Recorder(), []
        coroutine = loop.connect_accepted_socket(protocol, HandedSocket(read_end, socket.AF_INET))
        assert step_adoption(coroutine, read_end, protocol,
                             lambda *failure: failures.append(failure)) is None
        [(fd, failed_protocol, exc)] = failures
        assert (fd, failed_protocol) == (read_end, protocol)
        assert isinstance(exc, OSError) and exc.errno == errno.ENOTSOCK
        assert protocol.transport is None
    finally:
        os.close(read_end)
        os.close(write_end)


def test_stepping_by_hand_keeps_no_reference_and_swallows_no_interrupt():
    waited_on = object()

    @types.coroutine
    def waits_then_interrupts():
        yield waited_on
        raise KeyboardInterrupt

    failures = []
    references = sys.getrefcount(waited_on)
    coroutine = waits_then_interrupts()
    assert step_adoption(coroutine, 7, None, lambda *f: failures.append(f)) is waited_on
    assert sys.getrefcount(waited_on) == references     # the step's reference was given back
    # Only an Exception is an adoption's failure: an interrupt goes on up.
    with pytest.raises(KeyboardInterrupt):
        step_adoption(coroutine, 7, None, lambda *f: failures.append(f))
    assert failures == []
