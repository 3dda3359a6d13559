# cython: language_level=3
"""A response's status line and headers, for pyworker.asgi.

Compiled because in Python the head of a small response cost about 9,500
instructions (callgrind), an eighth of a whole keep-alive request; here it
costs a fraction of that.  Framing is decided here, not by the app: a
response without Content-Length is sent chunked (to an HTTP/1.0 client,
delimited by closing), the app's Transfer-Encoding is dropped, and header
names and values are checked so that an app cannot split a response.
"""

import re

from pyworker.http import KEEP_ALIVE_HEADER, SERVER_HEADER, STATUS_LINES

# RFC 9110 token characters for names; values may not hold CR, LF or NUL.
INVALID_HEADER_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
INVALID_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# The Content-Length lines of small bodies, made once: formatting one costs
# more than the rest of a header.
cdef tuple CONTENT_LENGTH_LINES = tuple(b"Content-Length: %d\r\n" % length
                                        for length in range(1024))
# The last lines of a head, by (HTTP/1.1 request?, keep the connection?).
cdef dict END_OF_HEAD = {key: line + b"\r\n" for key, line in KEEP_ALIVE_HEADER.items()}
cdef dict STATUS_LINE = STATUS_LINES
cdef bytes SERVER_LINE = SERVER_HEADER
cdef bytes CHUNKED_LINE = b"Transfer-Encoding: chunked\r\n"

# Response headers by what build_head does with them.
cdef enum HeaderKind:
    HEADER_PLAIN
    HEADER_LENGTH
    HEADER_FRAMING
    HEADER_CONNECTION
    HEADER_SERVER
    HEADER_DATE

cdef dict HEADER_KINDS = {b"content-length": HEADER_LENGTH, b"transfer-encoding": HEADER_FRAMING,
                          b"connection": HEADER_CONNECTION, b"server": HEADER_SERVER,
                          b"date": HEADER_DATE}
# Apps send the same headers again and again: each (name, value) is checked
# and rendered once, up to this many kept.
cdef dict HEADER_LINES = {}
cdef Py_ssize_t HEADER_LINES_KEPT = 512


cdef tuple header_line(name, value):
    """(the header's line, its kind); RuntimeError for one that could split a response."""
    if INVALID_HEADER_NAME.search(name) or INVALID_HEADER_VALUE.search(value) or not name:
        raise RuntimeError(f"invalid response header {name!r}: {value!r}")
    known = (b"%b: %b\r\n" % (name, value), HEADER_KINDS.get(name.lower(), HEADER_PLAIN))
    if len(HEADER_LINES) >= HEADER_LINES_KEPT:
        HEADER_LINES.clear()
    HEADER_LINES[name, value] = known
    return known


def build_head(cycle, body, bint more_body):
    """The status line and headers of `cycle`'s response, sent with its first body chunk.

    Decides the framing and records it on the cycle (its content_length,
    chunked and keep_alive); RuntimeError for a status or a header the app
    may not send.
    """
    status = cycle.status
    if not isinstance(status, int) or not 200 <= status <= 999:
        # 1xx answers are not final: a client would wait for another.
        raise RuntimeError(f"invalid response status {status!r}")
    protocol = cycle.protocol
    if protocol.queued_at is not None:
        # Off the worker's queue before the answer goes out: the client
        # may open its next connection before this worker runs again.
        protocol.server.dequeued(protocol)
    cdef list lines = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status]
    cdef bint has_server = False, has_date = False
    cdef bint keep_alive = cycle.keep_alive
    cdef bint head = cycle.head
    cdef bint http11 = cycle.http11
    cdef bint no_body = status == 204 or status == 304
    cdef int kind
    cdef Py_ssize_t length
    content_length = cycle.content_length
    for name, value in cycle.headers:
        known = HEADER_LINES.get((name, value))
        if known is None:
            known = header_line(name, value)
        line = (<tuple>known)[0]
        kind = (<tuple>known)[1]
        if kind == HEADER_PLAIN:
            lines.append(line)
        elif kind == HEADER_LENGTH:
            if not value.isdigit():     # int() would take "+5", "1_0", " 5"
                raise RuntimeError(f"invalid Content-Length {value!r}")
            content_length = int(value)
            lines.append(line)
        elif kind == HEADER_CONNECTION:
            # Written below, once.
            if value.lower() == b"close":
                keep_alive = False
        elif kind == HEADER_SERVER:
            has_server = True
            lines.append(line)
        elif kind == HEADER_DATE:
            has_date = True
            lines.append(line)
        # HEADER_FRAMING (Transfer-Encoding): framing is ours to decide.
    if not has_server:
        lines.append(SERVER_LINE)
    if not has_date:
        lines.append(protocol.server.responses.date_header)
    if content_length is None and not no_body:
        if not more_body and (body or not head):
            # For HEAD, the length the GET answer would have.
            length = len(body)
            content_length = length
            lines.append(CONTENT_LENGTH_LINES[length] if length < 1024
                         else b"Content-Length: %d\r\n" % length)
        elif head:
            pass    # nothing follows, and its length is unknown
        elif http11:
            cycle.chunked = True
            lines.append(CHUNKED_LINE)
        else:
            keep_alive = False     # HTTP/1.0: the end is the close
    if protocol.close_after:
        keep_alive = False
    cycle.content_length = content_length
    cycle.keep_alive = keep_alive
    lines.append(END_OF_HEAD[http11, keep_alive])
    return b"".join(lines)
