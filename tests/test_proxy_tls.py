"""--proxy-protocol with TLS: the PROXY header, then the TLS hello, on one connection.

What HAProxy sends in TCP mode with `send-proxy-v2` in front of a server that
ends TLS itself.  The worker must take the header off the socket and leave
every byte after it to the handshake, even when the hello comes in the same
packet.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from http_client import body_of, read_until_closed
from test_proxy_protocol import CLOSED, v1, v2
from test_tls import (  # noqa: F401  (certs is a fixture)
    APPS, certs, client_context, held_connections, serving)
from waiting import wait_until

HEADER_TIMEOUT = 2
REQUEST = b"GET /client HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def proxied_tls_request(server, context: ssl.SSLContext, header: bytes,
                        request: bytes = REQUEST, source: str = "127.0.0.1",
                        trickle: bool = False) -> bytes:
    """Send `header`, then TLS with `request` in it; what the server answers in TLS.

    The hello goes in the same send as the header (one packet on loopback),
    unless `trickle`: then the header goes a byte at a time first.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection((server.host, server.port), timeout=30,
                                  source_address=(source, 0)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if trickle:
            for index in range(len(header)):
                sock.sendall(header[index:index + 1])
                time.sleep(0.5 / len(header))   # paced, well within the deadline
            header = b""
        first = True
        while True:     # the handshake
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall((header if first else b"") + outgoing.read())
                first = False
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""  # closed with our bytes unread: the kernel resets
                if not data:
                    return CLOSED
                incoming.write(data)
        tls.write(request)
        sock.sendall(outgoing.read())
        answer = b""
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    return answer
                incoming.write(data)
                continue
            except ssl.SSLZeroReturnError:
                return answer
            if not chunk:
                return answer
            answer += chunk


@pytest.fixture(scope="module")
def proxied_tls(certs):  # noqa: F811
    from conftest import Server
    server = Server(*serving(certs), "--proxy-protocol", "--header-timeout",
                    str(HEADER_TIMEOUT), "--admin", "127.0.0.1:0", "--app-dir", APPS,
                    "edge_asgi:app", workers=2)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.mark.parametrize("header, client", [
    (v1("203.0.113.21", 41001), b"203.0.113.21 41001"),
    (v2("2001:db8::21", 41002), b"2001:db8::21 41002"),
], ids=["v1", "v2"])
def test_the_header_then_tls_names_the_client(proxied_tls, certs, header, client):  # noqa: F811
    answer = proxied_tls_request(proxied_tls, client_context(certs), header)
    assert body_of(answer) == client


def test_the_scheme_is_https(proxied_tls, certs):  # noqa: F811
    request = REQUEST.replace(b"/client", b"/scheme")
    answer = proxied_tls_request(proxied_tls, client_context(certs), v2("203.0.113.22", 1),
                                 request)
    assert body_of(answer) == b"https"


def test_a_header_trickled_before_the_hello_works(proxied_tls, certs):  # noqa: F811
    answer = proxied_tls_request(proxied_tls, client_context(certs),
                                 v1("203.0.113.23", 41003), trickle=True)
    assert body_of(answer) == b"203.0.113.23 41003"


def test_tls_without_a_header_is_closed(proxied_tls, certs):  # noqa: F811
    assert proxied_tls_request(proxied_tls, client_context(certs), b"") == CLOSED


def test_a_peer_not_trusted_is_closed(proxied_tls, certs):  # noqa: F811
    assert proxied_tls_request(proxied_tls, client_context(certs), v1("203.0.113.24", 1),
                               source="127.0.0.2") == CLOSED


def test_a_header_never_finished_is_closed_and_uncounted(proxied_tls, certs):  # noqa: F811
    with socket.create_connection((proxied_tls.host, proxied_tls.port), timeout=30) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.25")     # and nothing more
        started = time.monotonic()
        sock.settimeout(HEADER_TIMEOUT + 30)
        assert read_until_closed(sock) == CLOSED
    assert time.monotonic() - started >= HEADER_TIMEOUT - 0.1
    wait_until(lambda: held_connections(proxied_tls) == (0, 0), message="no connection held")
    # And the workers serve on.
    answer = proxied_tls_request(proxied_tls, client_context(certs), v1("203.0.113.26", 2))
    assert body_of(answer) == b"203.0.113.26 2"
