"""ASGI WebSockets, with the `websockets` package's sans-I/O protocol doing the framing.

An HTTP connection whose request asks to upgrade to a WebSocket becomes a
WebSocketSession: the transport is handed to it, the handshake (rebuilt from
what httptools parsed) and whatever followed it are fed to websockets'
ServerProtocol, and the app runs as one task that receives
`websocket.connect`, then messages, then `websocket.disconnect`.

websockets validates the handshake, (un)masks and (de)fragments frames,
answers pings, enforces --ws-max-size (closing with 1009) and runs the
closing handshake; this module moves bytes between it and the transport and
turns its frames into ASGI messages.  Reading pauses while the app has
INBOX_LIMIT messages it has not taken; `send` waits while the transport is
above its high-water mark.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import websockets.http11
from websockets.exceptions import InvalidState
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from pyworker.flow import WriteFlow
from pyworker.http import MAX_HEAD_BYTES

# The handshake's head was parsed and bounded by httptools (MAX_HEAD_BYTES)
# before websockets parses it again, with its own tighter limits (8 KB a
# line, 128 fields: its documented WEBSOCKETS_MAX_LINE_LENGTH and
# WEBSOCKETS_MAX_NUM_HEADERS): an upgrade with an 8 KB cookie, which plain
# HTTP takes, was refused 431.  They are read at each parse.
websockets.http11.MAX_LINE_LENGTH = max(websockets.http11.MAX_LINE_LENGTH, MAX_HEAD_BYTES)
websockets.http11.MAX_NUM_HEADERS = max(websockets.http11.MAX_NUM_HEADERS, MAX_HEAD_BYTES // 4)

log = logging.getLogger("cydispatch.worker")
# websockets says "connection open", "connection closed" and "connection
# rejected" at INFO for every WebSocket, naming neither client nor path:
# noise at the default level, kept for --log-level debug (logs.configure).
WEBSOCKETS_LOG = logging.getLogger("cydispatch.websocket")

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
INBOX_LIMIT = 16
# Bytes held back while the app decides whether to accept; reading pauses beyond.
HELD_LIMIT = 64 * 1024
# After our close frame, how long the client has to answer with its own.
CLOSE_TIMEOUT = 5.0
GOING_AWAY = 1001
INTERNAL_ERROR = 1011
ABNORMAL_CLOSURE = 1006


def is_websocket_upgrade(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"upgrade" and value.lower() == b"websocket":
            return True
    return False


class WebSocketSession(asyncio.Protocol):
    """One upgraded connection: websockets' ServerProtocol between the transport and the app."""

    def __init__(self, server, config, scope: dict, handshake: bytes) -> None:
        self.server = server
        self.config = config
        self.loop = server.loop
        self.scope = scope
        self.handshake = handshake
        self.conn = ServerProtocol(max_size=server.settings.ws_max_size, logger=WEBSOCKETS_LOG)
        self.transport = None
        self.request: Request | None = None
        self.inbox: collections.deque[dict] = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.accepted = False
        self.closed = False          # the app is done, or the connection is gone
        self.lost = False
        self.reading_paused = False
        self.writes = WriteFlow(self.loop)
        self.fragments: list[bytes] = []
        self.fragment_text = False
        self.close_timer: asyncio.TimerHandle | None = None
        self.last_active = server.now
        self.head_since = 0
        self.queued_at = None
        self.closing = False
        self.task: asyncio.Task | None = None
        self.response = None
        # Bytes that arrive before the app accepts (None once it has).
        self.held: list[bytes] | None = []
        self.held_bytes = 0

    def take_over(self, transport, rest: bytes) -> None:
        """Become the transport's protocol; `rest` arrived after the handshake."""
        self.transport = transport
        transport.set_protocol(self)
        # Frames sent right behind the handshake wait until the app has
        # accepted: websockets would answer a ping before our 101 went out.
        self.held = [rest] if rest else []
        self.data_received(self.handshake)
        self.held_bytes = len(rest)
        if self.held_bytes > HELD_LIMIT:
            self.pause_for_app()

    # asyncio.Protocol

    def connection_lost(self, exc) -> None:
        self.lost = self.closing = True
        # The client's close frame says why; without one the connection dropped.
        received = self.conn.close_rcvd
        self.push({"type": "websocket.disconnect",
                   "code": received.code if received else ABNORMAL_CLOSURE,
                   "reason": received.reason if received else ""})
        self.writes.lose()
        if self.close_timer is not None:
            self.close_timer.cancel()
        if self.queued_at is not None:
            # Refused at the handshake, or gone before the app accepted:
            # off the worker's queue, or the place stays taken for good.
            self.server.dequeued(self)
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        self.writes.pause(self.server.now)

    def resume_writing(self) -> None:
        self.writes.resume()

    def data_received(self, data: bytes) -> None:
        if self.held is not None and self.request is not None:
            self.held.append(data)
            self.held_bytes += len(data)
            if self.held_bytes > HELD_LIMIT:
                self.pause_for_app()
            return
        server = self.server
        server.begin()
        try:
            self.last_active = server.now
            self.conn.receive_data(data)
            for event in self.conn.events_received():
                if isinstance(event, Request):
                    self.connect(event)
                else:
                    self.frame(event)
            self.flush()
        finally:
            server.end()

    def eof_received(self) -> bool:
        self.conn.receive_eof()
        self.flush()
        return False

    # Frames in

    def connect(self, request: Request) -> None:
        self.request = request
        self.response = self.conn.accept(request)
        if self.response.status_code != 101:
            # Not a valid handshake (a bad key, version or method): websockets'
            # answer says why, and the app never hears of it.
            self.conn.send_response(self.response)
            self.held = None
            self.closed = True
            self.flush()
            self.transport.close()
            return
        subprotocols = []
        for value in request.headers.get_all("Sec-WebSocket-Protocol"):
            subprotocols += [token.strip() for token in value.split(",") if token.strip()]
        self.scope["subprotocols"] = subprotocols
        self.push({"type": "websocket.connect"})
        self.task = self.loop.create_task(self.run())

    def frame(self, frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self.fragments = [frame.data]
            self.fragment_text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT:
            self.fragments.append(frame.data)
        else:
            return      # ping, pong, close: websockets answers them itself
        if not frame.fin:
            return
        data = self.fragments[0] if len(self.fragments) == 1 else b"".join(self.fragments)
        self.fragments = []
        if self.fragment_text:
            # websockets has checked that text frames hold valid UTF-8.
            self.push({"type": "websocket.receive", "text": bytes(data).decode()})
        else:
            self.push({"type": "websocket.receive", "bytes": bytes(data)})
        if len(self.inbox) >= INBOX_LIMIT and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def flush(self) -> None:
        """Write what websockets has to send; an empty chunk means close the TCP side."""
        for chunk in self.conn.data_to_send():
            if chunk:
                self.transport.write(chunk)
            elif not self.transport.is_closing():
                self.transport.close()
        if self.conn.state is State.CLOSING and self.close_timer is None \
                and not self.transport.is_closing():
            self.close_timer = self.loop.call_later(CLOSE_TIMEOUT, self.transport.close)

    def push(self, message: dict) -> None:
        self.inbox.append(message)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # The app's side

    async def receive(self) -> dict:
        while not self.inbox:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        message = self.inbox.popleft()
        if self.reading_paused and len(self.inbox) < INBOX_LIMIT // 2 and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if self.lost or self.closed or (self.accepted and self.conn.state is not State.OPEN):
            # Closing (the client's close frame arrived, or the app sent its
            # own): nothing more can be sent (ASGI: an OSError).
            raise ConnectionResetError("the WebSocket is closed")
        if not self.accepted:
            if kind == "websocket.accept":
                self.accept(message)
            elif kind == "websocket.close":
                self.deny(403, "The application refused the connection.\n")
            else:
                raise RuntimeError(f"expected 'websocket.accept' or 'websocket.close', "
                                   f"got {kind!r}")
            return
        if kind == "websocket.send":
            text = message.get("text")
            if text is not None:
                self.conn.send_text(text.encode())
            else:
                self.conn.send_binary(message.get("bytes") or b"")
            self.flush()
            if self.writes.paused:
                await self.writes.drain()
        elif kind == "websocket.close":
            self.close(message.get("code") or 1000, message.get("reason") or "")
        else:
            raise RuntimeError(f"unexpected {kind!r} on an open WebSocket")

    def accept(self, message: dict) -> None:
        response = self.response
        subprotocol = message.get("subprotocol")
        if subprotocol:
            response.headers["Sec-WebSocket-Protocol"] = subprotocol
        for name, value in message.get("headers") or ():
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        self.conn.send_response(response)
        self.flush()
        self.accepted = True
        if self.queued_at is not None:
            self.server.dequeued(self)
        held, self.held = b"".join(self.held), None
        if self.reading_paused and len(self.inbox) < INBOX_LIMIT:
            self.reading_paused = False
            self.transport.resume_reading()
        if held:
            self.data_received(held)

    def pause_for_app(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def deny(self, status: int, text: str) -> None:
        self.held = None
        self.conn.send_response(self.conn.reject(status, text))
        self.flush()
        self.closed = True
        self.transport.close()

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake (the app's, or the worker's as it stops)."""
        if self.conn.state is State.OPEN:
            try:
                self.conn.send_close(code, reason)
            except InvalidState:
                pass
            self.flush()

    async def run(self) -> None:
        try:
            await self.config.app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if isinstance(exc, ConnectionResetError) and \
                    (self.lost or self.conn.state is not State.OPEN):
                log.debug("WebSocket app ended on a closed connection: %r", exc)
            elif not self.lost:
                log.error("exception in the application on WebSocket %s",
                          self.scope["path"], exc_info=exc)
            if not self.lost and not self.closed:
                if self.accepted:
                    self.close(INTERNAL_ERROR)
                else:
                    self.deny(500, "Internal Server Error\n")
        else:
            if not self.lost and not self.closed:
                if self.accepted:
                    self.close(1000)
                else:
                    # The app returned without accepting: refused.
                    self.deny(403, "The application refused the connection.\n")
        finally:
            self.closed = True
            if self.queued_at is not None:
                self.server.dequeued(self)
            self.server.requests += 1

    # Called by the worker

    def shutdown(self) -> None:
        """The worker is draining: the app may go on until the graceful deadline."""

    def going_away(self) -> None:
        """The graceful period is over: close with 1001."""
        if not self.lost:
            self.close(GOING_AWAY, "server shutting down")
            if not self.transport.is_closing():
                self.transport.close()

    def check_timeouts(self, now: float, idle_cutoff: float, head_cutoff: float,
                       send_cutoff: float) -> None:
        # An open WebSocket may stay idle (its app decides), but a client that
        # stopped reading must not hold the app's send() forever.
        if not self.lost and self.writes.stalled(send_cutoff):
            self.transport.abort()


def handshake_bytes(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request as websockets' parser wants it, rebuilt from what httptools parsed."""
    lines = [method, b" ", url, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)


def websocket_scope(http_scope: dict) -> dict:
    scope = dict(http_scope)
    scope["type"] = "websocket"
    scope["scheme"] = "wss" if http_scope["scheme"] == "https" else "ws"
    scope["asgi"] = ASGI_VERSION
    scope.pop("method", None)
    return scope

