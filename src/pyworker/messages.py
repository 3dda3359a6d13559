"""A worker's end of its message socket: cluster.broadcast out, the cluster's messages in.

Apart from the channel connections arrive on: the worker stops reading that
one while its hand is full, and messages must still arrive then.  Nothing
here is on a connection's path.  A packet out is one message's JSON; a
packet in is the sender's worker id and then the JSON (cydispatch.messages).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading

from cydispatch import cluster
from cydispatch.messages import READS_PER_TURN, SENDER, Outbox

log = logging.getLogger("cydispatch.worker")


class MessageLink:
    """Sends this worker's broadcasts in order and hands arriving messages to cluster.deliver."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = 0
        # Broadcasts the primary's socket had no room for, bounded like the
        # primary's outboxes.
        self.outbox = Outbox()
        self.writing = False
        self.dropping = False
        # Guards the switch from sending in the caller's thread (no loop yet:
        # the app is being imported or started) to sending on the loop.
        self.starting = threading.Lock()

    def send(self, payload: bytes) -> None:
        """cluster.broadcast's way out: from any thread, in the caller's order."""
        if threading.get_ident() == self.loop_thread:
            self.send_now(payload)
            return
        with self.starting:
            loop = self.loop
            if loop is None:
                self.send_now(payload)  # what finds no room goes once it serves
                return
        try:
            loop.call_soon_threadsafe(self.send_now, payload)
        except RuntimeError:
            pass    # the loop is closed: the worker is exiting

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin receiving (the app has started) and send what waited."""
        with self.starting:
            self.loop = loop
            self.loop_thread = threading.get_ident()
        loop.add_reader(self.sock.fileno(), self.on_readable)
        self.flush()

    def close(self) -> None:
        if self.loop is not None and self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            if self.writing:
                self.loop.remove_writer(self.sock.fileno())
        self.sock.close()

    def send_now(self, payload: bytes) -> None:
        waiting = bool(self.outbox)
        if not self.outbox.send(self.sock, payload):
            if not self.dropping:
                self.dropping = True
                log.warning("Worker %d: the primary takes no messages; dropping "
                            "broadcasts beyond the %d waiting", os.getpid(),
                            len(self.outbox))
        elif self.outbox and not waiting and self.loop is not None:
            self.writing = True
            self.loop.add_writer(self.sock.fileno(), self.flush)

    def flush(self) -> None:
        self.outbox.flush(self.sock)
        if self.outbox:
            if not self.writing:
                self.writing = True
                self.loop.add_writer(self.sock.fileno(), self.flush)
            return
        self.dropping = False
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.sock.fileno())

    def on_readable(self) -> None:
        for _ in range(READS_PER_TURN):
            try:
                packet = self.sock.recv(SENDER.size + cluster.MAX_MESSAGE_BYTES)
            except BlockingIOError:
                return
            except OSError:
                packet = b""
            if not packet:
                # The primary is gone; the channel's end starts the drain.
                self.loop.remove_reader(self.sock.fileno())
                return
            (sender,) = SENDER.unpack_from(packet)
            cluster.deliver(json.loads(packet[SENDER.size:]), sender)
