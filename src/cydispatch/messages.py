"""The primary's side of messages between workers: read each worker's, send to all.

Each worker has a message socket of its own (a SOCK_SEQPACKET socketpair,
apart from the channel connections are handed over: the worker stops
reading that one while its hand is full, and the Dispatcher reads reports
off it in C).  A packet from a worker is one message's JSON; the primary
prefixes the sender's worker id and sends the packet on to every live
worker, the sender included, without parsing it.

The router's sockets sit in an epoll of its own, which the Dispatcher
watches for it (Dispatcher.watch_python): the accept loop returns to Python
when a message is waiting or an outbox can drain, and never reads or writes
these sockets itself.  Nothing here blocks: sends are non-blocking, and what
a worker's socket has no room for waits in that worker's outbox, bounded;
beyond the bound the message is dropped for that worker and counted, so a
stopped or slow worker costs the primary at most OUTBOX_BYTES.
"""

from __future__ import annotations

import collections
import errno
import logging
import select
import socket
import struct

from cydispatch.cluster import MAX_MESSAGE_BYTES

log = logging.getLogger("cydispatch.primary")

# What a worker receives: the sender's worker id, then the message's JSON.
SENDER = struct.Struct("<i")
# What waits in the primary for one worker beyond the kernel's socket buffer
# (about 200 KB): a few seconds of a busy app's broadcasts, and little
# memory even with every worker stopped.
OUTBOX_MESSAGES = 4096
OUTBOX_BYTES = 4 * 1024 * 1024
# Packets read from one worker per turn of the loop, so that a worker that
# broadcasts without pause cannot hold the accept loop.
READS_PER_TURN = 64
# A send with no room: try again when the socket can take more.
NO_ROOM = (errno.EAGAIN, errno.ENOBUFS)


class Outbox:
    """Packets for one socket, in order, with what it had no room for waiting, bounded.

    Both ends use one: the primary for each worker, a worker for its
    broadcasts.  Non-blocking sends only; the caller watches for room while
    something waits (bool(outbox)) and then calls flush.
    """

    __slots__ = ("packets", "size")

    def __init__(self) -> None:
        self.packets: collections.deque[bytes] = collections.deque()
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self.packets)

    def __len__(self) -> int:
        return len(self.packets)

    def send(self, sock: socket.socket, packet: bytes) -> bool:
        """Send `packet` after what waits; False when it had to be dropped (full)."""
        if not self.packets:
            try:
                sock.send(packet)
                return True
            except OSError as exc:
                if exc.errno not in NO_ROOM:
                    return True     # EPIPE, ECONNRESET: the other end is gone
        if len(self.packets) >= OUTBOX_MESSAGES or self.size + len(packet) > OUTBOX_BYTES:
            return False
        self.packets.append(packet)
        self.size += len(packet)
        return True

    def flush(self, sock: socket.socket) -> None:
        """Send what waits, oldest first, until the socket is full."""
        while self.packets:
            try:
                sock.send(self.packets[0])
            except OSError as exc:
                if exc.errno in NO_ROOM:
                    return
                self.clear()    # the other end is gone
                return
            self.size -= len(self.packets.popleft())

    def clear(self) -> None:
        self.packets.clear()
        self.size = 0


class WorkerLink:
    """The primary's end of one worker's message socket, and its outbox."""

    __slots__ = ("sock", "worker_id", "outbox", "reading", "dropping")

    def __init__(self, sock: socket.socket, worker_id: int) -> None:
        self.sock = sock
        self.worker_id = worker_id
        self.outbox = Outbox()
        self.reading = True         # in the poller, until the worker's end closes
        self.dropping = False       # its outbox is full (logged once)


class MessageRouter:
    """Every live worker's message socket: broadcasts in, sent on to all."""

    def __init__(self) -> None:
        self.poller = select.epoll()
        self.links: dict[int, WorkerLink] = {}     # by the dispatcher's channel number
        self.by_fd: dict[int, WorkerLink] = {}
        # One buffer for every read: room for the sender's id, then the
        # message, and a byte more to tell an oversized one.
        self.buffer = bytearray(SENDER.size + MAX_MESSAGE_BYTES + 1)
        self.broadcast_total = 0    # messages received from workers
        self.dropped_total = 0      # deliveries dropped: an outbox was full

    def fileno(self) -> int:
        return self.poller.fileno()

    def open(self, channel: int, worker_id: int) -> socket.socket:
        """A message socket for a new worker; returns the worker's end, to inherit."""
        primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        primary_end.setblocking(False)
        link = WorkerLink(primary_end, worker_id)
        self.poller.register(primary_end.fileno(), select.EPOLLIN)
        self.links[channel] = link
        self.by_fd[primary_end.fileno()] = link
        return worker_end

    def close(self, channel: int) -> None:
        """The worker is gone: what waited for it goes nowhere."""
        link = self.links.pop(channel, None)
        if link is None:
            return
        del self.by_fd[link.sock.fileno()]
        if link.reading:
            self.poller.unregister(link.sock.fileno())
        link.sock.close()

    def close_all(self) -> None:
        for channel in list(self.links):
            self.close(channel)
        self.poller.close()

    def pump(self) -> None:
        """Read what workers broadcast and send on what waits; never blocks."""
        for fd, events in self.poller.poll(0):
            link = self.by_fd.get(fd)
            if link is None:
                continue
            if events & select.EPOLLOUT:
                self.flush(link)
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self.read(link)

    def read(self, link: WorkerLink) -> None:
        view = memoryview(self.buffer)
        for _ in range(READS_PER_TURN):
            try:
                size = link.sock.recv_into(view[SENDER.size:])
            except BlockingIOError:
                return
            except OSError:
                size = 0    # ECONNRESET: as the end of the stream
            if not size:
                # The worker's end is closed: its exit (SIGCHLD) closes ours;
                # meanwhile its hang-up must not wake the loop at every turn
                # (epoll reports one whatever it is asked for).
                link.reading = False
                self.poller.unregister(link.sock.fileno())
                link.outbox.clear()
                return
            if size > MAX_MESSAGE_BYTES:
                # The worker's cluster.broadcast refuses these; not ours to pass on.
                log.warning("Dropping a message over %d bytes from worker %d",
                            MAX_MESSAGE_BYTES, link.worker_id)
                continue
            self.broadcast_total += 1
            SENDER.pack_into(view, 0, link.worker_id)
            packet = bytes(view[:SENDER.size + size])
            for target in self.links.values():
                self.send(target, packet)

    def send(self, link: WorkerLink, packet: bytes) -> None:
        if not link.reading:
            return      # its worker is gone
        waiting = bool(link.outbox)
        if not link.outbox.send(link.sock, packet):
            self.dropped_total += 1
            if not link.dropping:
                link.dropping = True
                log.warning("Worker %d is not reading its messages: dropping those "
                            "that do not fit its outbox (%d messages, %d bytes)",
                            link.worker_id, len(link.outbox), link.outbox.size)
        elif link.outbox and not waiting:
            self.watch(link)    # the first to wait: wake when there is room

    def flush(self, link: WorkerLink) -> None:
        link.outbox.flush(link.sock)
        if link.dropping and not link.outbox:
            link.dropping = False
            log.info("Worker %d reads its messages again", link.worker_id)
        self.watch(link)

    def watch(self, link: WorkerLink) -> None:
        """Wake for what the link needs: its messages, and room for its outbox."""
        if link.reading:
            self.poller.modify(link.sock.fileno(), select.EPOLLIN
                               | (select.EPOLLOUT if link.outbox else 0))
