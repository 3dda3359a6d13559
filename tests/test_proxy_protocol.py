"""--proxy-protocol: PROXY headers (v1, v2) from trusted peers, end to end, and the parser alone."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import time
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import APPS, Server
from http_client import body_of, read_until_closed
from pyworker.proxy_protocol import ProxyHeader, ProxyHeaderError, parse_header
from waiting import wait_until

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_LOCAL, V2_PROXY = 0x20, 0x21
V2_TCP4, V2_TCP6, V2_UNSPEC = 0x11, 0x21, 0x00
# A TLV of each kind HAProxy sends (ALPN, authority, unique id): skipped.
TLVS = b"\x01\x00\x08http/1.1" + b"\x02\x00\x0bexample.com" + b"\x05\x00\x04abcd"
# PP2_TYPE_SSL with the client bit set, and a TLSv1.3 version sub-TLV; then
# the same with the bit clear (the client did not use TLS).
CLIENT_TLS = b"\x20\x00\x0e\x01\x00\x00\x00\x00" + b"\x21\x00\x07TLSv1.3"
NO_CLIENT_TLS = b"\x20\x00\x05\x00\x00\x00\x00\x00"
REQUEST = b"GET /client HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
CLOSED = b""    # what a client reads from a connection closed without an answer
HEADER_TIMEOUT = 2


# Building headers as a proxy sends them

def v1(source: str, source_port: int, family: str = "TCP4") -> bytes:
    destination = "127.0.0.1" if family == "TCP4" else "::1"
    return f"PROXY {family} {source} {destination} {source_port} 8000\r\n".encode()


def v2(source: str = "", source_port: int = 0, command: int = V2_PROXY,
       tlvs: bytes = b"") -> bytes:
    if not source:
        family, addresses = V2_UNSPEC, b""
    else:
        address = ipaddress.ip_address(source)
        destination = ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
        family = V2_TCP4 if address.version == 4 else V2_TCP6
        addresses = address.packed + destination.packed + struct.pack("!HH", source_port, 8000)
    rest = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(rest)) + rest


# Talking to a server

def exchange(server, data: bytes, source: str = "127.0.0.1", timeout: float = 30) -> bytes:
    """Send `data` from `source`, read until the server closes (reset reads as closed)."""
    with socket.create_connection((server.host, server.port), timeout=timeout,
                                  source_address=(source, 0)) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def client_seen(server, header: bytes) -> str:
    """What the app says the client is, asked behind `header`."""
    return body_of(exchange(server, header + REQUEST)).decode()


def serve(*args: str, workers: int = 1) -> Server:
    return Server("--app-dir", APPS, "--proxy-protocol", *args, workers=workers)


@pytest.fixture(scope="module", params=["edge_asgi:app", "wsgi_edge:app"],
                ids=["asgi", "wsgi"])
def app_server(request):
    """An ASGI and a WSGI app (its REMOTE_ADDR), each behind --proxy-protocol."""
    server = serve(request.param, "--header-timeout", str(HEADER_TIMEOUT), workers=2)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


# The client a header names

@pytest.mark.parametrize("header, client", [
    (v1("203.0.113.7", 40001), "203.0.113.7 40001"),
    (v1("2001:db8::7", 40002, "TCP6"), "2001:db8::7 40002"),
    (v2("203.0.113.8", 40003, tlvs=TLVS), "203.0.113.8 40003"),
    (v2("2001:db8::8", 40004, tlvs=TLVS), "2001:db8::8 40004"),
], ids=["v1-tcp4", "v1-tcp6", "v2-tcp4-tlvs", "v2-tcp6-tlvs"])
def test_the_app_sees_the_client_the_header_names(app_server, header, client):
    assert client_seen(app_server, header) == client


@pytest.mark.parametrize("header", [v2(command=V2_LOCAL), v2(), b"PROXY UNKNOWN\r\n"],
                         ids=["v2-local", "v2-unspec", "v1-unknown"])
def test_a_header_without_a_client_keeps_the_peer_address(app_server, header):
    # HAProxy's health checks send LOCAL: the proxy itself is the client.
    assert client_seen(app_server, header).split()[0] == "127.0.0.1"


def test_requests_in_the_same_packet_as_the_header_are_served(app_server):
    pipelined = v2("203.0.113.9", 40005) + b"GET /client HTTP/1.1\r\nHost: t\r\n\r\n" + REQUEST
    response = exchange(app_server, pipelined)
    assert response.count(b"HTTP/1.1 200 ") == 2
    assert response.count(b"203.0.113.9 40005") == 2


def test_a_header_trickled_byte_by_byte_within_the_deadline_works(app_server):
    data = v2("203.0.113.10", 40006, tlvs=TLVS) + REQUEST
    with socket.create_connection((app_server.host, app_server.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(len(data)):
            sock.sendall(data[index:index + 1])
            # Paced so that the bytes arrive apart, well within the deadline.
            time.sleep(0.5 / len(data))
        response = read_until_closed(sock)
    assert body_of(response) == b"203.0.113.10 40006"


def test_forwarded_headers_from_the_named_client_are_not_trusted(app_server):
    # The header says who the client is; what that client claims is its own business.
    forged = REQUEST.replace(b"Host: t\r\n", b"Host: t\r\nX-Forwarded-For: 198.51.100.1\r\n")
    assert body_of(exchange(app_server, v1("203.0.113.11", 40007) + forged)) \
        == b"203.0.113.11 40007"


# Closed without an answer

def test_a_peer_not_in_forwarded_allow_ips_is_closed(app_server):
    # 127.0.0.2 is loopback but not in the default 127.0.0.1,::1.
    assert exchange(app_server, v1("203.0.113.7", 1) + REQUEST, source="127.0.0.2") == CLOSED


def test_a_trusted_peer_without_a_header_is_closed(app_server):
    assert exchange(app_server, REQUEST) == CLOSED


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 203.0.113.7 127.0.0.1 40001\r\n",              # a port missing
    b"PROXY TCP5 203.0.113.7 127.0.0.1 40001 8000\r\n",         # no such family
    b"PROXY TCP4 2001:db8::1 127.0.0.1 40001 8000\r\n",         # IPv6 as TCP4
    b"PROXY TCP4 203.0.113.7 127.0.0.1 +4001 8000\r\n",         # not digits
    b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 8000\n",           # bare LF
    b"PROXY TCP4 " + b"1" * 120 + b"\r\n",                      # over 107 bytes
    b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12),      # version 3
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x51\x00\x0c" + bytes(12),      # no such family
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4),       # too short for TCP4
], ids=["v1-short", "v1-family", "v1-mismatch", "v1-port", "v1-lf", "v1-oversized",
        "v2-version", "v2-family", "v2-short"])
def test_a_malformed_header_is_closed(app_server, header):
    assert exchange(app_server, header + REQUEST) == CLOSED


def test_a_header_never_completed_is_closed_after_the_header_timeout(app_server):
    with socket.create_connection((app_server.host, app_server.port), timeout=30) as sock:
        sock.sendall(v2("203.0.113.7", 40001)[:20])
        started = time.monotonic()
        assert read_until_closed(sock) == CLOSED
        waited = time.monotonic() - started
    # Checked once a tick (1 s), with one tick of grace.
    assert HEADER_TIMEOUT - 0.1 <= waited < HEADER_TIMEOUT + 8, waited


def test_the_worker_goes_on_after_every_kind_of_refusal(app_server):
    # Each kind once more, so that this holds when the test runs alone.
    assert exchange(app_server, v1("203.0.113.7", 1) + REQUEST, source="127.0.0.2") == CLOSED
    assert exchange(app_server, REQUEST) == CLOSED
    assert exchange(app_server, b"PROXY TCP5 203.0.113.7 127.0.0.1 1 2\r\n" + REQUEST) \
        == CLOSED
    # No refusal took a worker down: the two that started still serve.
    assert app_server.worker_pids() == set(app_server.started_workers())
    assert not app_server.find(r"Traceback|died")
    assert client_seen(app_server, v1("203.0.113.12", 40008)) == "203.0.113.12 40008"


# Every mode, and the connection counts

def connection_count(admin: str) -> int:
    with urllib.request.urlopen(f"http://{admin}/status", timeout=10) as response:
        return sum(w["connections"] for w in json.load(response)["workers"])


@pytest.mark.parametrize("mode", ["dispatch", "reuseport", "shared"])
def test_every_mode_counts_a_proxied_connection_once(mode):
    server = serve("edge_asgi:app", "--mode", mode, "--admin", "127.0.0.1:0")
    try:
        server.wait_ready()
        admin = server.wait_for_log(r"Admin endpoint on http://([\d.:]+) ")[0].group(1)
        assert client_seen(server, v2("203.0.113.7", 40001)) == "203.0.113.7 40001"
        with socket.create_connection((server.host, server.port), timeout=30) as held:
            held.sendall(v1("203.0.113.8", 40002) + b"GET /client HTTP/1.1\r\nHost: t\r\n\r\n")
            received = b""
            while not received.endswith(b"203.0.113.8 40002"):
                chunk = held.recv(65536)
                assert chunk, received
                received += chunk
            # Handed from the header's reader to HTTP: one connection, not two.
            wait_until(lambda: connection_count(admin) == 1, message="1 open connection")
        exchange(server, REQUEST)   # refused: no header
        wait_until(lambda: connection_count(admin) == 0, message="no open connection")
    finally:
        server.stop()


def test_the_builtin_app_serves_behind_a_proxy_header():
    server = Server("--proxy-protocol", workers=1)
    try:
        server.wait_ready()
        assert body_of(exchange(server, v2("203.0.113.7", 40001) + REQUEST.replace(
            b"/client", b"/"))).startswith(b"Hello from Worker ")
        assert exchange(server, REQUEST) == CLOSED
    finally:
        server.stop()


def test_forwarded_headers_behind_a_header_without_a_client_are_not_trusted(app_server):
    # UNKNOWN relays a client it does not name: the proxy does not vouch for
    # what that client claims, though the peer (the proxy) is trusted.
    forged = REQUEST.replace(b"Host: t\r\n", b"Host: t\r\nX-Forwarded-For: 198.51.100.1\r\n")
    for header in (b"PROXY UNKNOWN\r\n", v2()):
        assert body_of(exchange(app_server, header + forged)).split()[0] == b"127.0.0.1"


def test_a_client_that_spoke_tls_to_the_proxy_is_served_as_https(app_server):
    # HAProxy ending TLS, with send-proxy-v2-ssl: the app must build https URLs.
    scheme = REQUEST.replace(b"/client", b"/scheme")
    assert body_of(exchange(app_server, v2("203.0.113.12", 1, tlvs=CLIENT_TLS) + scheme)) \
        == b"https"
    assert body_of(exchange(app_server, v2("203.0.113.12", 1, tlvs=NO_CLIENT_TLS) + scheme)) \
        == b"http"
    assert body_of(exchange(app_server, v1("203.0.113.12", 1) + scheme)) == b"http"


# The parser alone

@pytest.mark.parametrize("data, header", [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET", ProxyHeader(("1.2.3.4", 1), 32)),
    (b"PROXY TCP6 2001:db8::2 ::1 65535 0\r\n", ProxyHeader(("2001:db8::2", 65535), 36)),
    (b"PROXY TCP6 2001:DB8:0::1 ::1 80 80\r\n", ProxyHeader(("2001:db8::1", 80), 36)),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(None, 15)),
    (b"PROXY UNKNOWN whatever follows\r\n", ProxyHeader(None, 32)),
    (v2("1.2.3.4", 5) + b"GET", ProxyHeader(("1.2.3.4", 5), 28)),
    (v2("1.2.3.4", 5, tlvs=TLVS), ProxyHeader(("1.2.3.4", 5), 28 + len(TLVS))),
    (v2("::1", 6), ProxyHeader(("::1", 6), 52)),
    (v2(command=V2_LOCAL, tlvs=TLVS), ProxyHeader(None, 16 + len(TLVS), relayed=False)),
    # LOCAL ignores its family and addresses, whatever they are.
    (V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12), ProxyHeader(None, 28, relayed=False)),
    # send-proxy-v2-ssl: the client's TLS, with its own sub-TLVs (version).
    (v2("1.2.3.4", 5, tlvs=TLVS + CLIENT_TLS), ProxyHeader(("1.2.3.4", 5), 28 + len(TLVS)
                                                          + len(CLIENT_TLS), tls=True)),
    (v2("1.2.3.4", 5, tlvs=NO_CLIENT_TLS), ProxyHeader(("1.2.3.4", 5), 28 + len(NO_CLIENT_TLS))),
    # AF_UNIX: no address to use.
    (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), ProxyHeader(None, 232)),
])
def test_parser_reads_a_complete_header(data, header):
    assert parse_header(data) == header


@pytest.mark.parametrize("data", [
    b"P", b"PROXY", b"PROXY TCP4 1.2.3.4", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
    V2_SIGNATURE[:1], V2_SIGNATURE, v2("1.2.3.4", 5)[:16], v2("1.2.3.4", 5)[:27],
    v2("1.2.3.4", 5, tlvs=TLVS)[:-1],
])
def test_parser_waits_for_the_rest_of_a_header(data):
    assert parse_header(data) is None


@pytest.mark.parametrize("data", [
    b"G", b"GET / HTTP/1.1\r\n", b"PROXX", b"\r\n\r\n\x00\r\nQUIX",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",         # a field too many
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",          # two spaces
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",       # port out of range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n",    # not ASCII
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",          # a leading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    b"PROXY " + b"x" * 101,                          # 107 bytes, no CRLF
    V2_SIGNATURE + b"\x22\x11\x00\x00",              # command 2
    V2_SIGNATURE + b"\x11\x11\x00\x00",              # version 1
    V2_SIGNATURE + b"\x21\x10\x00\x0c" + bytes(12),  # no protocol
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # too short for TCP6
    v2("1.2.3.4", 5, tlvs=b"\x20\x00"),              # ends inside a TLV's head
    v2("1.2.3.4", 5, tlvs=b"\x20\x00\x05\x01"),      # ... inside its value
])
def test_parser_refuses_what_cannot_be_a_header(data):
    with pytest.raises(ProxyHeaderError):
        parse_header(data)


VALID_HEADERS = [v1("203.0.113.7", 1), v1("2001:db8::7", 2, "TCP6"), b"PROXY UNKNOWN\r\n",
                 v2("203.0.113.8", 3, tlvs=TLVS), v2("2001:db8::8", 4), v2(command=V2_LOCAL)]


@pytest.mark.parametrize("header", VALID_HEADERS)
def test_parser_waits_at_every_split_of_a_valid_header(header):
    for end in range(len(header)):
        assert parse_header(header[:end]) is None, header[:end]
    assert parse_header(header + REQUEST).length == len(header)


@given(st.sampled_from(VALID_HEADERS), st.binary(max_size=40), st.integers(0, 120))
def test_parser_says_more_header_or_error_for_any_bytes(header, noise, at):
    # A valid header with bytes overwritten somewhere: never another exception.
    data = header[:at] + noise + header[at + len(noise):]
    try:
        result = parse_header(data)
    except ProxyHeaderError:
        return
    assert result is None or 0 < result.length <= len(data)
