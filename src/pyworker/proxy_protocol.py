"""PROXY protocol (HAProxy's, v1 and v2): who the client is, said before the first byte of HTTP.

A load balancer that relays TCP (HAProxy's `send-proxy`, `send-proxy-v2`)
opens each connection with a header naming the client it relays.  With
--proxy-protocol every connection must start with one, from a peer in
--forwarded-allow-ips: anything else is closed without an answer, since what
follows a missing or broken header is not known to be HTTP.

Two pieces, as h11 would have them: `parse_header`, bytes in and a header
(or "need more") out, never touching a socket; and `ProxyHeaderReader`, the
protocol a connection starts with, which feeds it and then hands the
transport to the HTTP protocol.  The HTTP protocols themselves know nothing
of this: without the flag no byte of theirs goes through here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from typing import NamedTuple

from pyworker.http import ConnectionProtocol

log = logging.getLogger("cydispatch.worker")

V1_PREFIX = b"PROXY "
# The spec's bound on a v1 line, CRLF included ("PROXY UNKNOWN" plus two
# IPv6 addresses and two ports is 104).
V1_MAX_BYTES = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# A TLV's type and length; the type of the one about the client's TLS, and
# its flag that the client used TLS.
TLV_HEAD = struct.Struct("!BH")
PP2_TYPE_SSL, PP2_CLIENT_SSL = 0x20, 0x01
# Signature, version and command, family and protocol, length of the rest.
V2_FIXED = struct.Struct("!12sBBH")
V2_VERSION = 0x2
V2_LOCAL, V2_PROXY = 0x0, 0x1
# Address family (high nibble of the 14th byte) -> the address block's layout:
# source address, destination address, source port, destination port.
V2_ADDRESSES = {
    0x1: (struct.Struct("!4s4sHH"), ipaddress.IPv4Address),
    0x2: (struct.Struct("!16s16sHH"), ipaddress.IPv6Address),
}
V2_UNSPEC, V2_UNIX = 0x0, 0x3
V2_STREAM, V2_DGRAM = 0x1, 0x2
V1_FAMILIES = {"TCP4": ipaddress.IPv4Address, "TCP6": ipaddress.IPv6Address}


class ProxyHeaderError(ValueError):
    """The connection does not start with a well-formed PROXY header."""


class ProxyHeader(NamedTuple):
    # The client the proxy relays, as (address, port); None: keep the peer's
    # own address (v2 LOCAL for health checks, UNKNOWN, UNSPEC, AF_UNIX).
    client: tuple[str, int] | None
    # Bytes the header took: what follows is the client's.
    length: int
    # False for v2 LOCAL only: the proxy's own connection, not a client's.
    relayed: bool = True
    # The client spoke TLS to the proxy (v2's PP2_TYPE_SSL, client bit set).
    tls: bool = False


def parse_header(data: bytes) -> ProxyHeader | None:
    """The PROXY header `data` starts with; None while more bytes are needed.

    Raises ProxyHeaderError as soon as the bytes cannot begin a header, so a
    peer that sends HTTP straight away is told apart at its first byte.
    """
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        return parse_v2(data) if len(data) >= V2_FIXED.size else None
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        return parse_v1(data)
    raise ProxyHeaderError("not a PROXY protocol header")


def parse_v1(data: bytes) -> ProxyHeader | None:
    """`PROXY TCP4|TCP6 SOURCE DESTINATION SPORT DPORT\\r\\n`, or `PROXY UNKNOWN...\\r\\n`."""
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(data) >= V1_MAX_BYTES:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX_BYTES} bytes")
        if b"\n" in data:
            raise ProxyHeaderError("v1 header ends without CRLF")
        return None
    try:
        fields = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    if fields[1:2] == ["UNKNOWN"]:
        return ProxyHeader(None, end + 2)   # the rest of the line is to be ignored
    if len(fields) != 6 or fields[1] not in V1_FAMILIES:
        raise ProxyHeaderError(f"malformed v1 header {data[:end]!r}")
    address_type = V1_FAMILIES[fields[1]]
    try:
        source = address_type(fields[2])
        address_type(fields[3])
    except ValueError:
        raise ProxyHeaderError(f"bad {fields[1]} address in {data[:end]!r}") from None
    source_port = v1_port(fields[4])
    v1_port(fields[5])
    return ProxyHeader((str(source), source_port), end + 2)


def v1_port(text: str) -> int:
    # int() would take "+80", " 80" or "8_0"; the spec says digits.
    if not text.isdigit() or not text.isascii() or len(text) > 5 or int(text) > 65535:
        raise ProxyHeaderError(f"bad port {text!r} in v1 header")
    return int(text)


def parse_v2(data: bytes) -> ProxyHeader | None:
    """The binary header: fixed 16 bytes, then addresses and TLVs (skipped)."""
    _, version_command, family_protocol, rest_length = V2_FIXED.unpack_from(data)
    version, command = version_command >> 4, version_command & 0xF
    if version != V2_VERSION or command not in (V2_LOCAL, V2_PROXY):
        raise ProxyHeaderError(f"v2 header with version/command byte {version_command:#04x}")
    length = V2_FIXED.size + rest_length
    if len(data) < length:
        return None
    if command == V2_LOCAL:
        # The proxy's own connection (a health check): the real endpoints stand.
        return ProxyHeader(None, length, relayed=False)
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family == V2_UNSPEC or (family == V2_UNIX and protocol in (V2_STREAM, V2_DGRAM)):
        return ProxyHeader(None, length)    # no address we could use
    layout = V2_ADDRESSES.get(family)
    if layout is None or protocol not in (V2_STREAM, V2_DGRAM):
        raise ProxyHeaderError(f"v2 header with family/protocol byte {family_protocol:#04x}")
    addresses, address_type = layout
    if rest_length < addresses.size:
        raise ProxyHeaderError(f"v2 header too short for its addresses ({rest_length} bytes)")
    source, _, source_port, _ = addresses.unpack_from(data, V2_FIXED.size)
    tls = client_used_tls(data[V2_FIXED.size + addresses.size:length])
    return ProxyHeader((str(address_type(source)), source_port), length, tls=tls)


def client_used_tls(tlvs: bytes) -> bool:
    """Whether v2's TLVs say the client spoke TLS to the proxy (send-proxy-v2-ssl).

    A proxy that ends TLS itself sends plain HTTP on; this is how the app
    still learns its scheme is https.  The other TLVs are skipped.
    """
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise ProxyHeaderError("v2 header ends inside a TLV")
        kind, size = TLV_HEAD.unpack_from(tlvs, offset)
        value = tlvs[offset + 3:offset + 3 + size]
        if len(value) < size:
            raise ProxyHeaderError("v2 header ends inside a TLV")
        if kind == PP2_TYPE_SSL and value[:1] and value[0] & PP2_CLIENT_SSL:
            return True
        offset += 3 + size
    return False


class ProxyHeaderReader(ConnectionProtocol):
    """A connection's first protocol: reads the PROXY header, then hands over.

    It stands in the worker's set of connections until then (the tick checks
    its deadline, a stop waits for it), and hands its place to the HTTP
    protocol, which sees the client the header named and the bytes after it.
    """

    __slots__ = ("server", "serve", "trust", "queued_at", "transport", "received",
                 "opened_at", "closing")

    def __init__(self, server, serve, trust, queued_at: int | None = None) -> None:
        self.server = server
        self.serve = serve          # the worker's factory of HTTP protocols
        self.trust = trust          # pyworker.proxy.ProxyTrust
        self.queued_at = queued_at
        self.transport = None
        self.received = b""
        self.opened_at = server.now
        self.closing = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connection_opened(self)
        peer = transport.get_extra_info("peername")
        if not (isinstance(peer, tuple) and self.trust.allows(peer[0])):
            # Only a proxy we trust may say who the client is; anyone else
            # could claim any address.
            log.debug("closed a connection from %s: not in --forwarded-allow-ips", peer)
            self.close()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.received += data
        try:
            header = parse_header(self.received)
        except ProxyHeaderError as exc:
            log.info("closed a connection from %s: %s",
                     self.transport.get_extra_info("peername"), exc)
            self.close()
            return
        if header is not None:
            self.hand_over(header)

    def hand_over(self, header: ProxyHeader) -> None:
        protocol = self.serve(self.queued_at)
        self.queued_at = None
        self.closing = True     # the transport is the HTTP protocol's from here
        self.server.connection_handed_on(self)
        serve_relayed(self.transport, protocol, header)
        rest = self.received[header.length:]
        self.received = b""
        if rest:
            protocol.data_received(rest)

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.queued_at is not None:
            self.server.dequeued(self)
        self.server.connection_closed(self)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.transport.close()

    # Called by the worker

    def shutdown(self) -> None:
        """Nothing to cut short: the HTTP protocol, made once the header is in, answers once."""

    def check_timeouts(self, now: float, idle_cutoff: float, head_cutoff: float,
                       send_cutoff: float) -> None:
        # --header-timeout, as for a request's head: a peer that never
        # finishes its header must not hold a connection (slowloris).
        if not self.closing and self.opened_at < head_cutoff:
            log.debug("closed a connection: no PROXY header within --header-timeout")
            self.close()


# Reading the header off the socket itself, for TLS

# Bytes a complete header can take: v2's fixed part and its largest rest.
MAX_HEADER_BYTES = V2_FIXED.size + 0xFFFF


async def read_header_off_socket(loop, fd: int, trust, deadline: float) -> ProxyHeader:
    """The PROXY header `fd`'s stream starts with, taken off the socket, not a byte more.

    Under TLS the header comes before the client's hello, which the TLS
    layer must read itself: a protocol above the transport (ProxyHeaderReader)
    would see the header inside TLS, where it never is.  Bytes are peeked,
    and only those known to be header are taken: all of an unfinished
    header's, exactly the rest of a finished one's.  Raises ProxyHeaderError
    (a peer not trusted, bytes that are no header), OSError, or TimeoutError
    at `deadline` (the loop's clock).
    """
    sock = socket.socket(fileno=fd)
    try:
        peer = sock.getpeername()
        if not (isinstance(peer, tuple) and trust.allows(peer[0])):
            raise ProxyHeaderError(f"{peer} is not in --forwarded-allow-ips")
        taken = b""
        while True:
            try:
                peeked = sock.recv(MAX_HEADER_BYTES - len(taken), socket.MSG_PEEK)
            except BlockingIOError:
                await readable(loop, fd, deadline)
                continue
            if not peeked:
                raise ProxyHeaderError("closed before the end of its PROXY header")
            header = parse_header(taken + peeked)
            if header is not None:
                sock.recv(header.length - len(taken))
                return header
            # Not finished: every byte so far is the header's.
            taken += sock.recv(len(peeked))
    finally:
        sock.detach()   # the fd goes on to the TLS transport, or is closed by the caller


async def readable(loop, fd: int, deadline: float) -> None:
    """Until `fd` has bytes to read; TimeoutError at `deadline`."""
    waiter = loop.create_future()

    def wake(result=None, error=None) -> None:
        if not waiter.done():
            if error is None:
                waiter.set_result(result)
            else:
                waiter.set_exception(error)

    loop.add_reader(fd, wake)
    timer = loop.call_at(deadline, wake, None, TimeoutError("no PROXY header within "
                                                            "--header-timeout"))
    try:
        await waiter
    finally:
        loop.remove_reader(fd)
        timer.cancel()


class HandOnWithClient(asyncio.Protocol):
    """Hands a TLS connection to its HTTP protocol with the client its PROXY header named.

    uvloop calls connection_made once the handshake is done, and may pass
    the first request at once after: the client is set before that.
    """

    __slots__ = ("protocol", "header")

    def __init__(self, protocol, header: ProxyHeader) -> None:
        self.protocol = protocol
        self.header = header

    def __call__(self):
        return self     # its own factory, as ConnectionProtocol

    def connection_made(self, transport) -> None:
        serve_relayed(transport, self.protocol, self.header)


def serve_relayed(transport, protocol, header: ProxyHeader) -> None:
    """Give `transport` to the HTTP `protocol`, with the client `header` relays.

    The client is set before any request can reach the protocol: the caller
    feeds it what followed the header only after this returns.
    """
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if header.relayed:
        protocol.client_named_by_proxy(header.client, header.tls)
