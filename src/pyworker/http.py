"""HTTP/1.1 on httptools: keep-alive, pipelining, HEAD, and bad input answered, not fatal.

One HttpProtocol per connection.  Requests are answered as they complete, in
order, so pipelined requests get their responses in the order they were sent.
A malformed request gets 400, an oversized head 431, an oversized body 413;
each closes the connection and nothing else: the worker goes on.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from http import HTTPStatus

import httptools

log = logging.getLogger("cydispatch.worker")

# The request line and headers together: beyond this, 431.
MAX_HEAD_BYTES = 64 * 1024
# A body sent to a route that takes none is read and dropped up to this; 413 beyond.
MAX_DISCARDED_BODY_BYTES = 1024 * 1024

SERVER_HEADER = b"Server: cydispatch\r\n"
CONTENT_TYPE = b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: "
STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()
    for status in HTTPStatus
}
KEEP_ALIVE_HEADER = {  # (HTTP/1.1 request?, keep the connection?) -> header
    (True, True): b"",
    (True, False): b"Connection: close\r\n",
    (False, True): b"Connection: keep-alive\r\n",
    (False, False): b"Connection: close\r\n",
}


def date_header() -> bytes:
    return b"Date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"


class Responses:
    """Whole responses, built once per second.

    A response differs from the last one like it only by its Date header,
    which changes once a second (tick()); building it from parts costs more
    than the rest of a small request (measured: ~0.5 of ~2.2 us).
    """

    # Enough for every route's usual answers; bodies that differ every time
    # (/slow?ms=N for many N) are built but not all kept.
    KEPT = 64

    def __init__(self) -> None:
        self.date_header = date_header()
        self.kept: dict[tuple, bytes] = {}

    def tick(self) -> None:
        self.date_header = date_header()
        self.kept.clear()

    def error(self, status: int) -> bytes:
        """A short plain-text answer to input that cannot be served; the connection closes."""
        return self.get(status, f"{HTTPStatus(status).phrase}\n".encode(), False, True, False)

    def get(self, status: int, body: bytes, keep_alive: bool, http11: bool,
            head: bool) -> bytes:
        key = (status, body, keep_alive, http11, head)
        response = self.kept.get(key)
        if response is None:
            response = b"".join((
                STATUS_LINES[status], SERVER_HEADER, self.date_header,
                CONTENT_TYPE, b"%d\r\n" % len(body),
                KEEP_ALIVE_HEADER[http11, keep_alive],
                b"Allow: GET, HEAD\r\n" if status == 405 else b"", b"\r\n",
                b"" if head else body,
            ))
            if len(self.kept) < self.KEPT:
                self.kept[key] = response
        return response


class RequestRejected(Exception):
    """Raised from a parser callback to answer `status` and close."""

    def __init__(self, status: int) -> None:
        self.status = status


class StopParsing(Exception):
    """Raised from a parser callback to ignore the rest of the input."""


class ConnectionProtocol(asyncio.Protocol):
    """A protocol the worker makes before its connection's transport exists.

    uvloop's connect_accepted_socket asks for a protocol factory; the
    worker has the protocol already (Worker.adopt_all), so the protocol is
    its own factory: a closure per connection would cost more.
    """

    __slots__ = ()

    def __call__(self):
        return self


class HttpProtocol(ConnectionProtocol):
    """Serves one connection.

    `server` is the worker: it has the responses of this second (Responses),
    a coarse clock for idle timeouts, knows whether it is draining, and counts
    connections.
    """

    __slots__ = (
        "server", "app", "transport", "parser", "target", "head_bytes",
        "head_seen", "in_body", "body_bytes", "closing", "close_after",
        "last_active", "served", "queued_at", "http11", "head_since",
    )

    def __init__(self, server, app, queued_at: int | None = None) -> None:
        self.server = server
        self.app = app
        self.transport = None
        self.parser = None
        self.target = b""
        self.head_bytes = 0     # exact, from the parser: target and headers
        self.head_seen = 0      # bytes received since the head began, a bound
        self.in_body = False
        self.body_bytes = 0
        self.closing = False
        self.close_after = False    # answer one request, then close
        self.last_active = server.now
        # When the head in progress began (0: none); a new connection owes one.
        self.head_since = server.now
        self.served = 0
        self.http11: bool | None = None     # the client's version, read once
        # The worker's tick when this connection was handed over, until its
        # first request is answered: until then it is in the worker's queue.
        self.queued_at = queued_at

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        # Read now, not when the protocol was made: a TLS handshake may
        # have ended after a drain began.
        self.close_after = self.server.draining
        self.server.connection_opened(self)

    def client_named_by_proxy(self, client: tuple[str, int] | None, tls: bool) -> None:
        """A PROXY protocol header named the client: the built-in app has no use for it."""

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.queued_at is not None:
            self.server.dequeued(self)
        self.server.connection_closed(self)
        # The parser calls back into this protocol and the transport holds it:
        # break both cycles so refcounting frees a connection at once, instead
        # of the cyclic collector, at a cost to every request, later.
        self.parser = None
        self.transport = None

    def pause_writing(self) -> None:
        # The client does not read its responses: stop reading its requests.
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        server = self.server
        # The primary sees how long this worker has been in here: one that
        # stays long (a slow request) gets no new connections meanwhile.
        server.begin()
        try:
            self.last_active = server.now
            # Bytes since a head began, or since the body's last piece (a
            # chunked body's trailers: see AsgiProtocol.data_received).
            self.head_seen += len(data)
            if not self.in_body and not self.head_since:
                self.head_since = server.now
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                if isinstance(cause, RequestRejected):
                    self.reject(cause.status)
                elif not isinstance(cause, StopParsing):
                    log.exception("request handling failed", exc_info=cause)
                    self.reject(500)
            except httptools.HttpParserUpgrade:
                # Upgrades (WebSocket, h2c) are not served; the request before
                # the upgrade point was answered and the connection closes.
                self.close()
            except httptools.HttpParserError:
                self.reject(400)
            else:
                # A head still arriving after this many bytes is too large,
                # even if the parser has not yet seen where its headers end.
                if self.head_seen > MAX_HEAD_BYTES and not self.closing:
                    self.reject(431)
        finally:
            server.end()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.closing:
            raise StopParsing()

    def on_url(self, url: bytes) -> None:
        self.target += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise RequestRejected(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            raise RequestRejected(431)

    def on_headers_complete(self) -> None:
        self.head_since = 0
        self.in_body = True
        self.head_seen = 0

    def on_body(self, body: bytes) -> None:
        self.head_seen = 0
        self.body_bytes += len(body)
        if self.body_bytes > MAX_DISCARDED_BODY_BYTES:
            raise RequestRejected(413)

    def on_message_complete(self) -> None:
        parser = self.parser
        method = parser.get_method()
        keep_alive = (parser.should_keep_alive() and not self.close_after
                      and not parser.should_upgrade())
        if self.http11 is None:
            # httptools builds a new string per call; a client does not
            # change its HTTP version between requests on one connection.
            self.http11 = parser.get_http_version() == "1.1"
        target = self.target
        self.target = b""
        self.head_bytes = self.head_seen = self.body_bytes = 0
        self.in_body = False
        try:
            status, body = self.app(method, target)
        except Exception:
            log.exception("application error on %r", target)
            status, body, keep_alive = 500, b"Internal Server Error\n", False
        if self.queued_at is not None:
            # Off the queue before the answer goes out: the client may open
            # its next connection before this worker runs another line.
            self.server.dequeued(self)
        self.respond(status, body, keep_alive, self.http11, method == b"HEAD")
        self.served += 1
        server = self.server
        server.requests += 1
        # Served within this callback: its time is the time since begin(), or
        # since the request before it in the same read was answered.
        server.observe_since_begin()
        if not keep_alive:
            self.close()

    # Responses

    def respond(self, status: int, body: bytes, keep_alive: bool, http11: bool,
                head: bool = False) -> None:
        self.transport.write(
            self.server.responses.get(status, body, keep_alive, http11, head))
        self.last_active = self.server.now

    def reject(self, status: int) -> None:
        """Answer a request that cannot be served, then close."""
        if self.closing:
            return
        self.transport.write(self.server.responses.error(status))
        self.last_active = self.server.now
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # Called by the worker

    def shutdown(self) -> None:
        """The worker is stopping: close now if idle, else after the next response.

        Idle means between requests on a connection that has served one; a new
        connection is about to send its first request (it may already be in
        the socket buffer), so it gets that request answered first.
        """
        self.close_after = True
        if (not self.closing and self.served and self.head_seen == 0
                and not self.in_body):
            self.close()

    def check_timeouts(self, now: float, idle_cutoff: float, head_cutoff: float,
                       send_cutoff: float) -> None:
        """Once a tick: close a connection idle too long, answer 408 to a head too slow."""
        if self.closing:
            return
        if self.head_since and self.head_since < head_cutoff:
            # Its request line and headers have been trickling in too long.
            self.reject(408)
        elif self.last_active < idle_cutoff:
            self.close()
