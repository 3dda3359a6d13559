# cython: annotation_typing=False, nonecheck=True
# (Compiled: annotations stay documentation, and a field read through None
# raises AttributeError, as in Python, instead of crashing the worker.)
"""ASGI 3 over HTTP/1.1 on httptools: one AsgiProtocol per connection, one RequestCycle per request.

The parser's callbacks build each request's scope; the request runs as a task
that calls the app with the cycle's `receive` and `send`.  Both complete
without suspending whenever nothing has to wait (the body is already here,
the transport has room), so a small request costs one task and no other
switch.

Requests on a connection run one at a time, in order: a request that arrives
while another runs waits in `pipeline`; up to PIPELINE_LIMIT are read ahead,
then reading pauses.  The
request body is buffered up to BODY_HIGH_WATER, then reading pauses until the
app takes it.  The response waits while the transport is above its high-water
mark, so a slow reader cannot make the worker buffer a large response.

Framing is decided here, not by the app: a response without Content-Length is
sent chunked (or, to an HTTP/1.0 client, delimited by closing); a response to
HEAD carries no body; header names and values are checked so that an app
cannot split a response.

This module is compiled by Cython (setup.py), with asgi.pxd making the
connection, its requests and the shared settings extension types: their
fields are C struct members and the calls between them C calls.  In the
interpreter a keep-alive request of a raw ASGI app cost 74k instructions,
compiled 58k (bench/request_instructions.py).  The source stays plain
Python.  A method asgi.pxd declares `cdef` can only be called through a
variable Cython knows to be of its class (`self`, a typed field): called on
an untyped one it would be looked up as a Python attribute and not found.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import re
import sys
from time import monotonic
from urllib.parse import unquote

import httptools

from pyworker.flow import WriteFlow
from pyworker.websocket import (
    WebSocketSession, handshake_bytes, is_websocket_upgrade, websocket_scope,
)
from pyworker.http import (
    KEEP_ALIVE_HEADER, MAX_HEAD_BYTES, SERVER_HEADER, STATUS_LINES, RequestRejected,
)

log = logging.getLogger("cydispatch.worker")
access_log = logging.getLogger("cydispatch.access")

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
# Requests read ahead of the one running before reading pauses.
PIPELINE_LIMIT = 4
# Request body buffered for the app before reading pauses.
BODY_HIGH_WATER = 64 * 1024
# A body the app did not read is read and dropped, so that the next request
# on the connection can be parsed; beyond this, the connection closes instead.
MAX_DISCARDED_BODY_BYTES = 1024 * 1024
# Transport write buffer limits: above HIGH, send() waits until below LOW.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024
# Final statuses whose responses never carry a body (1xx are refused outright).
NO_BODY_STATUSES = frozenset((204, 304))
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Python 3.12 and later can run a task's first step at once (eager_start):
# a request whose app does not wait is then served without a turn of the loop.
EAGER_TASKS = sys.version_info >= (3, 12)
# Request headers that need a second look once the head is complete.
NOTED_FORWARDED, NOTED_EXPECT, NOTED_CONNECTION, NOTED_HOST, NOTED_CODING = 1, 2, 4, 8, 16
NOTED_HEADERS = {b"x-forwarded-for": NOTED_FORWARDED, b"x-forwarded-proto": NOTED_FORWARDED,
                 b"x-forwarded-host": NOTED_FORWARDED, b"expect": NOTED_EXPECT,
                 # llhttp reads Proxy-Connection as it reads Connection.
                 b"connection": NOTED_CONNECTION, b"proxy-connection": NOTED_CONNECTION,
                 b"host": NOTED_HOST, b"transfer-encoding": NOTED_CODING}
METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


# RFC 9110 token characters for names; values may not hold CR, LF or NUL.
INVALID_HEADER_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
INVALID_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# The Content-Length lines of small bodies, made once: formatting one costs
# more than the rest of a header.
CONTENT_LENGTH_LINES = tuple(b"Content-Length: %d\r\n" % length for length in range(1024))
# The last lines of a head, by (HTTP/1.1 request?, keep the connection?).
END_OF_HEAD = {key: line + b"\r\n" for key, line in KEEP_ALIVE_HEADER.items()}
CHUNKED_HEADER = b"Transfer-Encoding: chunked\r\n"
STATUS_LINE_OF = STATUS_LINES    # the same table, typed for build_head (asgi.pxd)
# Response headers by what build_head does with them.
HEADER_PLAIN, HEADER_LENGTH, HEADER_FRAMING, HEADER_CONNECTION, HEADER_SERVER, HEADER_DATE = range(6)
HEADER_KINDS = {b"content-length": HEADER_LENGTH, b"transfer-encoding": HEADER_FRAMING,
                b"connection": HEADER_CONNECTION, b"server": HEADER_SERVER,
                b"date": HEADER_DATE}
# Apps send the same headers again and again: each (name, value) is checked
# and rendered once, up to this many kept.
HEADER_LINES: dict[tuple[bytes, bytes], tuple[bytes, int]] = {}
HEADER_LINES_KEPT = 512


def header_line(name: bytes, value: bytes) -> tuple[bytes, int]:
    """(the header's line, its kind); RuntimeError for one that could split a response."""
    if INVALID_HEADER_NAME.search(name) or INVALID_HEADER_VALUE.search(value) or not name:
        raise RuntimeError(f"invalid response header {name!r}: {value!r}")
    known = (b"%b: %b\r\n" % (name, value), HEADER_KINDS.get(name.lower(), HEADER_PLAIN))
    if len(HEADER_LINES) >= HEADER_LINES_KEPT:
        HEADER_LINES.clear()
    HEADER_LINES[name, value] = known
    return known


class ClientDisconnected(OSError):
    """send() after the client went away (ASGI spec 2.4: an OSError subclass)."""


class AsgiConfig:
    """What every connection of a worker shares: the app and the settings it needs."""

    def __init__(self, app, settings, trust, state: dict | None,
                 native: bool = True, local: tuple | None = None) -> None:
        self.app = app
        self.root_path = settings.root_path
        self.root_path_bytes = settings.root_path.encode("ascii")
        self.trust = trust
        self.state = state
        self.access_log = settings.access_log
        # What the client spoke to us; a trusted proxy's X-Forwarded-Proto may say otherwise.
        self.scheme = "https" if settings.ssl_certfile else "http"
        # An ASGI app of the user's (not a WSGI one in its adapter): it gets
        # WebSockets, and its steps stamp the worker busy (WorkerChannel.stamped).
        self.native = native
        # The listening address, when it is not a wildcard: every
        # connection's `server`.  None: ask each connection.
        self.local = local


def check_transfer_coding(headers: list) -> None:
    """Chunked is the only transfer coding served.

    Not last, the body's length is unknown: 400 (RFC 9112, 6.3), as llhttp
    would say.  Another before it (gzip, chunked) would reach the app still
    coded, unannounced: 501 (RFC 9112, 6.1).
    """
    codings = []
    for name, value in headers:
        if name == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",") if c.strip()]
    if not codings or codings[-1] != b"chunked":
        raise RequestRejected(400)
    if len(codings) > 1:
        raise RequestRejected(501)


class RequestCycle:
    """One request: its scope, its body as it arrives, and the response's state."""

    def __init__(self, protocol: AsgiProtocol, scope: dict, keep_alive: bool,
                 expect_continue: bool, http11: bool) -> None:
        self.protocol = protocol
        self.scope = scope
        self.body: list[bytes] = []
        self.body_size = 0          # buffered, not yet taken by the app
        self.body_complete = False
        self.body_delivered = False  # the app has received more_body False
        self.discarded = 0
        self.expect_continue = expect_continue
        self.waiter: asyncio.Future | None = None
        self.disconnected = False
        self.keep_alive = keep_alive
        self.response_started = False
        self.response_complete = False
        self.status = 0
        self.headers = ()
        self.chunked = False
        self.content_length: int | None = None
        self.sent_bytes = 0
        self.head = scope["method"] == "HEAD"
        self.head_sent = False
        self.http11 = http11
        self.response_bytes = 0

    # Fed by the protocol

    def feed_body(self, chunk: bytes) -> None:
        if self.response_complete or self.disconnected:
            self.discarded += len(chunk)
            if self.discarded > MAX_DISCARDED_BODY_BYTES:
                # The app answered without the body; reading all of a large
                # one just to keep the connection is not worth it.
                self.protocol.close()
            return
        self.body.append(chunk)
        self.body_size += len(chunk)
        if self.body_size > BODY_HIGH_WATER:
            self.protocol.pause_reading()
        self.wake()

    def lose_connection(self) -> None:
        self.disconnected = True
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = waiter = self.protocol.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    # The app's side

    async def receive(self) -> dict:
        if self.expect_continue and not self.response_started and not self.disconnected:
            self.expect_continue = False
            self.protocol.transport.write(CONTINUE_RESPONSE)
        while not (self.disconnected or self.response_complete):
            if self.body_size or (self.body_complete and not self.body_delivered):
                body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
                self.body.clear()
                self.body_size = 0
                more_body = not self.body_complete
                self.body_delivered = not more_body
                if more_body:
                    self.protocol.resume_reading()
                return {"type": "http.request", "body": body, "more_body": more_body}
            # Nothing to hand over: the body is on its way, or all delivered
            # and only a disconnect (or the end of the response) is left.
            if not self.body_complete:
                self.protocol.resume_reading()
            await self.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self.response_started = True
            self.status = message["status"]
            self.headers = message.get("headers", ())
            return
        if kind != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {kind!r}")
        if self.response_complete:
            raise RuntimeError("the response is complete; nothing more can be sent")
        protocol = self.protocol
        if self.disconnected or protocol.transport.is_closing():
            # A failed write closes the transport at once but reports the loss
            # only on the loop's next turn: an app that streams without ever
            # waiting must learn of it here.
            raise ClientDisconnected("the client has gone")
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        data = b"" if self.head_sent else self.build_head(body, more_body)
        if self.head or self.status in NO_BODY_STATUSES:
            pass
        elif self.chunked:
            if body:
                data += b"%x\r\n%b\r\n" % (len(body), body)
            if not more_body:
                data += b"0\r\n\r\n"
        elif body:
            self.sent_bytes += len(body)
            if self.content_length is not None and self.sent_bytes > self.content_length:
                raise RuntimeError(f"the response body is longer than its "
                                   f"Content-Length ({self.content_length})")
            data = data + body if data else body
        self.head_sent = True
        if data:
            protocol.transport.write(data)
            self.response_bytes += len(data)
        if not more_body:
            self.response_complete = True
            if self.content_length is not None and not self.head \
                    and self.sent_bytes < self.content_length \
                    and self.status not in NO_BODY_STATUSES:
                # The client would wait for the rest forever.
                self.keep_alive = False
            if self.waiter is not None:
                self.wake()     # a receive() waiting for a disconnect returns
        elif protocol.writes is not None and protocol.writes.paused:
            await protocol.writes.drain()
            if self.disconnected:
                raise ClientDisconnected("the client has gone")

    def build_head(self, body, more_body: bool) -> bytes:
        """Status line and headers, written with the first body chunk; the framing decided."""
        status = self.status
        if not isinstance(status, int) or not 200 <= status <= 999:
            # 1xx answers are not final: a client would wait for another.
            raise RuntimeError(f"invalid response status {status!r}")
        protocol = self.protocol
        if protocol.queued_at is not None:
            # Off the worker's queue before the answer goes out: the client
            # may open its next connection before this worker runs again.
            protocol.server.dequeued(protocol)
        lines = [STATUS_LINE_OF.get(status) or b"HTTP/1.1 %d \r\n" % status]
        has_server = has_date = False
        for name, value in self.headers:
            known = HEADER_LINES.get((name, value))
            if known is None:
                known = header_line(name, value)
            line, kind = known
            if kind == HEADER_PLAIN:
                lines.append(line)
            elif kind == HEADER_LENGTH:
                if not value.isdigit():     # int() would take "+5", "1_0", " 5"
                    raise RuntimeError(f"invalid Content-Length {value!r}")
                length = int(value)
                if self.content_length is not None:
                    if length != self.content_length:
                        # A client taking the first would read the next
                        # response into this one (RFC 9112, 6.3).
                        raise RuntimeError("two different Content-Length headers")
                    continue    # the same twice: once is enough
                self.content_length = length
                if status == 204:
                    continue    # a 204 has no length to give (RFC 9110, 8.6)
                lines.append(line)
            elif kind == HEADER_CONNECTION:
                # Written below, once.
                if value.lower() == b"close":
                    self.keep_alive = False
            elif kind == HEADER_SERVER:
                has_server = True
                lines.append(line)
            elif kind == HEADER_DATE:
                has_date = True
                lines.append(line)
            # HEADER_FRAMING (Transfer-Encoding): framing is ours to decide.
        if not has_server:
            lines.append(SERVER_HEADER)
        if not has_date:
            lines.append(protocol.server.responses.date_header)
        if self.content_length is None and status not in NO_BODY_STATUSES:
            if not more_body and (body or not self.head):
                # For HEAD, the length the GET answer would have.
                length = len(body)
                self.content_length = length
                lines.append(CONTENT_LENGTH_LINES[length] if length < len(CONTENT_LENGTH_LINES)
                             else b"Content-Length: %d\r\n" % length)
            elif self.head:
                pass    # nothing follows, and its length is unknown
            elif self.http11:
                self.chunked = True
                lines.append(CHUNKED_HEADER)
            else:
                self.keep_alive = False     # HTTP/1.0: the end is the close
        if protocol.close_after or (self.expect_continue and not self.body_complete):
            # Answered before the body was asked for, with no 100 Continue,
            # and the body is not all in: the client may send it or not (RFC
            # 9110, 10.1.1), and what follows on this connection cannot be
            # told apart from a next request.
            self.keep_alive = False
        lines.append(END_OF_HEAD[self.http11, self.keep_alive])
        return b"".join(lines)

    # The request's task

    async def run(self, app) -> None:
        protocol = self.protocol
        server = protocol.server
        started = monotonic()
        if protocol.queued_at is not None:
            # The loop has reached this request: it no longer waits behind
            # another.  From here the app's own steps mark the worker busy
            # while they compute (stamped), and while the app awaits (a
            # database, a sleep) the worker can take more connections: an
            # app that waits must not cap a worker at --queue-depth requests.
            server.dequeued(protocol)
        try:
            if protocol.config.native:
                # Busy while the app's code runs (a CPU-bound handler blocks the
                # loop): the primary then gives this worker no new connection.
                await server.stamped(app(self.scope, self.receive, self.send))
            else:
                await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if self.disconnected or isinstance(exc, ClientDisconnected):
                log.debug("request ended after the client went away: %r", exc)
            elif isinstance(exc, asyncio.CancelledError):
                log.warning("request %s %s cancelled", self.scope["method"],
                            self.scope["path"])
            else:
                log.error("exception in the application on %s %s", self.scope["method"],
                          self.scope["path"], exc_info=exc)
            # Whatever the app raised (SystemExit included), the worker goes on.
            if not self.head_sent:
                if not self.disconnected:
                    self.answer_error(500)
            else:
                protocol.close()    # the response cannot be finished
        else:
            if not self.response_complete and not self.disconnected:
                if not self.head_sent:
                    log.error("the application returned without a response to %s %s",
                              self.scope["method"], self.scope["path"])
                    self.answer_error(500)
                else:
                    log.error("the application returned before completing its "
                              "response to %s %s", self.scope["method"],
                              self.scope["path"])
                    protocol.close()
        finally:
            if self.response_complete:
                duration = monotonic() - started
                server.observe(duration)
                if protocol.config.access_log:
                    self.log_access(duration)
            protocol.cycle_finished(self)

    def answer_error(self, status: int) -> None:
        self.keep_alive = False
        self.status = status
        self.response_complete = True
        self.response_bytes = self.protocol.write_error(status)

    def log_access(self, duration: float) -> None:
        scope = self.scope
        client = scope["client"]
        query = scope["query_string"]
        target = scope["raw_path"].decode("ascii", "replace")
        if query:
            target += "?" + query.decode("ascii", "replace")
        access_log.info('%s - "%s %s HTTP/%s" %d %d %.1fms',
                        f"{client[0]}:{client[1]}" if client else "-",
                        scope["method"], target, scope["http_version"],
                        self.status, self.response_bytes, duration * 1000)


class AsgiProtocol:
    """One HTTP/1.1 connection serving an ASGI app."""

    def __init__(self, server, config: AsgiConfig, queued_at: int | None = None) -> None:
        self.server = server
        self.config = config
        self.loop = server.loop
        self.transport = None
        self.parser = None
        self.client = None
        self.local = None
        self.trusted_proxy = False
        self.scheme = config.scheme     # https too when a PROXY header says TLS
        # The request being parsed, the one running, those waiting their turn.
        self.parsing: RequestCycle | None = None
        self.cycle: RequestCycle | None = None
        # `cycle` is to start once the bytes in hand are parsed (data_received).
        self.cycle_due = False
        # The context the connection's callbacks run in: each request's task
        # runs in a copy of it (see start).
        self.context: contextvars.Context | None = None
        self.pipeline: collections.deque[RequestCycle] = collections.deque()
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.noted = 0      # NOTED_* flags of the head being parsed
        self.head_seen = 0
        self.head_since = server.now    # when the head in progress began; 0: none
        self.last_active = server.now
        self.closing = False
        self.close_after = False    # answer the requests read, then close
        self.reading_paused = False
        # Made when the transport first pauses writing: most connections
        # never fill it, and a WriteFlow costs a connection 3% (callgrind).
        self.writes: WriteFlow | None = None
        # A status to answer once the requests ahead of bad input are answered.
        self.rejected: int | None = None
        self.served = 0
        self.queued_at = queued_at
        self.websocket: tuple[dict, bytes] | None = None   # (scope, handshake) to upgrade
        self.scope_base: dict = {}

    def __call__(self):
        """Its own factory (see pyworker.http.ConnectionProtocol)."""
        return self

    # asyncio.Protocol's methods (compiled, this class cannot inherit
    # asyncio.Protocol: each one uvloop may call is defined here)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.context = contextvars.copy_context()
        # Read now, not when the protocol was made: a TLS handshake may
        # have ended after a drain began.
        self.close_after = self.server.draining
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.parser = httptools.HttpRequestParser(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = (peer[0], peer[1])
        # Every connection of a worker bound to one address has that address
        # as its own: one getsockname() a connection saved.
        local = self.config.local or transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            self.local = (local[0], local[1])
        self.trusted_proxy = self.config.trust.trusts(self.client[0] if self.client else None)
        self.rebase_scope()
        self.server.connection_opened(self)

    def client_named_by_proxy(self, client: tuple[str, int] | None, tls: bool) -> None:
        """A PROXY protocol header relays a client (pyworker.proxy_protocol).

        Its X-Forwarded-* headers count only if it is a trusted proxy itself;
        when the header does not say who it is (UNKNOWN, UNSPEC, a Unix
        socket), nobody vouches for them.  `tls`: it spoke TLS to the proxy.
        """
        if client is not None:
            self.client = client
        self.trusted_proxy = client is not None and self.config.trust.trusts(client[0])
        if tls:
            self.scheme = "https"
        self.rebase_scope()

    def rebase_scope(self) -> None:
        """What the scopes of this connection's requests share, as far as known."""
        self.scope_base = {
            "type": "http", "asgi": ASGI_VERSION, "http_version": "1.1",
            "server": self.local, "client": self.client, "scheme": self.scheme,
            "root_path": self.config.root_path,
        }

    def connection_lost(self, exc) -> None:
        self.closing = True
        for cycle in (self.cycle, self.parsing, *self.pipeline):
            if cycle is not None:
                cycle.lose_connection()
        self.pipeline.clear()
        if self.writes is not None:
            self.writes.lose()
        if self.queued_at is not None:
            self.server.dequeued(self)
        self.server.connection_closed(self)
        # The parser holds this protocol's callbacks, a request its protocol:
        # without these cycles refcounting frees a closed connection at once,
        # not the cyclic collector later, whose runs every connection paid for
        # (about 8% of a new connection's instructions, callgrind).
        self.parser = None
        self.parsing = None

    def eof_received(self) -> None:
        """The client sends no more: the transport closes, as asyncio.Protocol's default does.

        uvloop's TLS layer calls this with no fallback: without it a clean
        close_notify from a client became a logged error and an abort.
        """
        return None

    def pause_writing(self) -> None:
        if self.writes is None:
            self.writes = WriteFlow(self.loop)
        self.writes.pause(self.server.now)

    def resume_writing(self) -> None:
        if self.writes is not None:
            self.writes.resume()

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closing:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closing and len(self.pipeline) < PIPELINE_LIMIT \
                and self.rejected is None:
            parsing = self.parsing
            if parsing is None or parsing.body_size <= BODY_HIGH_WATER:
                self.reading_paused = False
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing or self.parser is None:
            return
        server = self.server
        server.begin()
        try:
            self.last_active = server.now
            # Bytes since a head began, or since the body's last piece: inside
            # a chunked body, what is not body is chunk sizes and trailers,
            # and httptools keeps an unfinished trailer whole, whatever its
            # size, before any callback of ours sees it.
            self.head_seen += len(data)
            if self.parsing is None and self.head_since == 0:
                self.head_since = server.now
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                if isinstance(cause, RequestRejected):
                    self.reject(cause.status)
                else:
                    log.exception("request handling failed", exc_info=cause)
                    self.reject(500)
            except httptools.HttpParserUpgrade as upgrade:
                self.upgrade(data[upgrade.args[0]:])
            except httptools.HttpParserError:
                self.reject(400)
            else:
                if self.head_seen > MAX_HEAD_BYTES and not self.closing:
                    self.reject(431)
        finally:
            server.end()
        if self.cycle_due:
            # After the parse, not in its callback: the request's body, if it
            # came with the head, is in hand, so the app's first step can take
            # it and usually finish the request without waiting.
            self.cycle_due = False
            self.start(self.cycle, EAGER_TASKS)

    # httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise RequestRejected(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.parsing is not None:
            return      # a chunked body's trailer: never a request header
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            raise RequestRejected(431)
        name = name.lower()
        self.headers.append((name, value))
        noted = NOTED_HEADERS.get(name)
        if noted is not None:       # one lookup: Host is in every request
            if noted & self.noted & NOTED_HOST:
                # Two Host fields: which one names the site is anybody's
                # guess, a proxy's and the app's apart (RFC 9112, 3.2).
                raise RequestRejected(400)
            self.noted |= noted

    def on_headers_complete(self) -> None:
        parser = self.parser
        config = self.config
        self.head_since = 0
        self.head_seen = 0
        # Read per request: each pipelined request says its own version.
        # Without a Connection (or Proxy-Connection) header llhttp keeps alive exactly the HTTP/1.1
        # requests (it refuses versions other than 0.9, 1.0, 1.1 and 2.0),
        # and get_http_version() formats a string: 3% of a small request.
        keep_alive = parser.should_keep_alive()
        if self.noted & NOTED_CONNECTION:
            http11 = parser.get_http_version() == "1.1"
        else:
            http11 = keep_alive
        if self.noted & NOTED_CODING:
            check_transfer_coding(self.headers)
        url = self.url
        if b"#" in url:
            raise RequestRejected(400)      # a fragment is the client's own (RFC 9112, 3.2)
        target_host = None
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
        elif url == b"*":
            raw_path, query = url, b""
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise RequestRejected(400) from None
            raw_path, query = parsed.path or b"/", parsed.query or b""
            if parsed.host:
                # The absolute form names the site; its Host field does not
                # count (RFC 9112, 3.2.2), or a proxy routing by the target
                # and the app reading Host would serve different sites.
                target_host = parsed.host
                if b":" in target_host:
                    target_host = b"[" + target_host + b"]"     # an IPv6 literal
                if parsed.port is not None:
                    target_host += b":%d" % parsed.port
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        method = parser.get_method()
        headers = self.headers
        client, scheme = self.client, self.scheme
        host = None
        noted = self.noted
        if target_host is not None:
            headers = [(n, target_host if n == b"host" else v) for n, v in headers]
        if noted & NOTED_FORWARDED and self.trusted_proxy:
            client, scheme, host = config.trust.apply(headers, client, scheme)
            if host is not None:
                headers = [(n, host if n == b"host" else v) for n, v in headers]
        expect_continue = False
        if noted & NOTED_EXPECT and http11:
            for name, value in headers:
                if name == b"expect" and value.lower() == b"100-continue":
                    expect_continue = True
        # Ready for the next request's head (httptools calls no callback at
        # its start that is worth a Python call per request).
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.noted = 0
        # What every request of this connection shares is copied, not built
        # key by key: a third of the cost of a scope.
        scope = self.scope_base.copy()
        if not http11:
            scope["http_version"] = "1.0"
        if client is not self.client:
            scope["client"] = client
        if scheme is not self.scheme:
            scope["scheme"] = scheme
        scope["method"] = METHODS.get(method) or method.decode("ascii")
        if config.root_path:
            scope["path"] = config.root_path + path
            scope["raw_path"] = config.root_path_bytes + raw_path
        else:
            scope["path"] = path
            scope["raw_path"] = raw_path
        scope["query_string"] = query
        scope["headers"] = headers
        if config.state is not None:
            scope["state"] = config.state.copy()
        keep_alive = keep_alive and not self.close_after
        if parser.should_upgrade():
            if config.native and is_websocket_upgrade(headers):
                self.websocket = websocket_scope(scope), handshake_bytes(method, url, headers)
                return
            # Another protocol (h2c), or a WSGI app: served as a plain request,
            # after which httptools reads no more from this connection.
            keep_alive = False
        cycle = RequestCycle(self, scope, keep_alive, expect_continue, http11)
        self.parsing = cycle
        if self.cycle is None:
            self.cycle = cycle
            self.cycle_due = True
        else:
            self.pipeline.append(cycle)
            if len(self.pipeline) >= PIPELINE_LIMIT:
                # Enough read ahead.  Below this, reading goes on, so a
                # client that leaves is seen by the request it waits for.
                self.pause_reading()

    def on_body(self, body: bytes) -> None:
        self.head_seen = 0
        self.parsing.feed_body(body)

    def on_message_complete(self) -> None:
        parsing = self.parsing
        if parsing is not None:
            self.parsing = None
            parsing.body_complete = True
            if parsing.waiter is not None:
                parsing.wake()

    # Requests

    def upgrade(self, rest: bytes) -> None:
        """The parser stopped at an upgrade: hand the connection to a WebSocket session."""
        if self.websocket is None:
            return      # served as a plain request; the rest is not HTTP/1.1
        if self.cycle is not None or self.pipeline:
            self.reject(400)    # an upgrade pipelined behind a request
            return
        scope, handshake = self.websocket
        session = WebSocketSession(self.server, self.config, scope, handshake)
        session.queued_at, self.queued_at = self.queued_at, None
        self.server.connection_replaced(self, session)
        self.closing = True     # this protocol is done with the transport
        self.parser = None
        session.take_over(self.transport, rest)

    def start(self, cycle: RequestCycle, eager: bool = False,
              context: contextvars.Context | None = None) -> None:
        """Run `cycle`'s request as a task; `eager`: its first step now, not on the next turn.

        The task runs in a copy of `context`, by default of the context of
        the caller: a callback of the connection's.
        """
        self.cycle = cycle
        if eager:
            asyncio.Task(cycle.run(self.config.app), loop=self.loop, context=context,
                         eager_start=True)
        elif context is None:
            self.loop.create_task(cycle.run(self.config.app))
        else:
            self.loop.create_task(cycle.run(self.config.app), context=context)

    def cycle_finished(self, cycle: RequestCycle) -> None:
        """The app is done with `cycle`: close, or go on with the next request."""
        self.cycle = None   # also when closing: see connection_lost
        self.served += 1
        self.server.requests += 1
        self.last_active = self.server.now
        if self.queued_at is not None:
            self.server.dequeued(self)
        if self.closing:
            return
        if not cycle.keep_alive or not cycle.response_complete:
            self.close()
            return
        if cycle.expect_continue and not cycle.body_complete:
            # Answered without the body, and without a 100 Continue: the client
            # may or may not send it, so what follows cannot be parsed.
            self.close()
            return
        if not cycle.body_complete and cycle.discarded + cycle.body_size > MAX_DISCARDED_BODY_BYTES:
            self.close()
            return
        # The body may still be arriving: it is read and dropped (feed_body).
        cycle.body.clear()
        cycle.body_size = 0
        if self.pipeline:
            # Called from the finished request's task: the next one must not
            # inherit what that one set in its context.
            self.start(self.pipeline.popleft(), False, self.context.copy())
        elif self.rejected is not None:
            self.write_error(self.rejected)
            self.close()
            return
        elif self.close_after and self.parsing is None:
            self.close()
            return
        if self.reading_paused:
            self.resume_reading()

    def reject(self, status: int) -> None:
        """Answer input that cannot be served, then close.

        Requests read before the bad input are still answered, in order; the
        error comes after them.  A request whose own body is malformed is
        void: its app answers nobody.
        """
        if self.closing or self.rejected is not None:
            return
        self.parser = None      # nothing more is parsed on this connection
        bad = self.parsing
        if bad is not None:
            self.parsing = None
            bad.lose_connection()
            if bad in self.pipeline:
                self.pipeline.remove(bad)
            elif bad.head_sent:
                # Its response is under way, or went out before the body was
                # all in (an app that answers without reading it): it cannot
                # be finished, and a second one would answer nothing.
                self.close()
                return
        running = self.cycle if self.cycle is not bad else None
        if running is not None or self.pipeline:
            self.rejected = status
            self.pause_reading()
            return
        self.write_error(status)
        self.close()

    def write_error(self, status: int) -> int:
        """Write a short error response (the connection closes after it); its size."""
        response = self.server.responses.error(status)
        self.transport.write(response)
        return len(response)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.transport is not None:
                self.transport.close()

    # Called by the worker

    def shutdown(self) -> None:
        """The worker is stopping: close now if idle, else after the current response."""
        self.close_after = True
        if not self.closing and self.cycle is None and self.parsing is None \
                and self.served and self.head_since == 0:
            self.close()

    def check_timeouts(self, now: float, idle_cutoff: float, head_cutoff: float,
                       send_cutoff: float) -> None:
        if self.closing:
            return
        if self.writes is not None and self.writes.stalled(send_cutoff):
            # The client stopped reading its response: free the app's send().
            self.transport.abort()
        elif self.head_since and self.head_since < head_cutoff and self.parsing is None:
            # Its request line and headers have been trickling in too long.
            self.reject(408)
        elif self.last_active < idle_cutoff and self.head_since == 0 and (
                self.cycle is None
                or (self.parsing is not None and self.parsing.waiter is not None)):
            # Idle between requests, a body stalled while the app waits for
            # it, or one the app did not want stalled while it is dropped.
            self.close()
