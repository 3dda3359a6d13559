"""Binding the listening socket, the same way for the primary and the workers."""

from __future__ import annotations

import errno
import socket


# How long the kernel holds a connection that has sent nothing before
# accepting it anyway.
DEFER_ACCEPT_SECONDS = 1


class ListenError(Exception):
    """The address cannot be listened on; the message is meant for the user."""


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def defer_accept(sock: socket.socket) -> None:
    """Make `sock` accept a connection only once its first bytes have arrived
    (nginx's "deferred"), and not block: an idle connection is never handed
    to a worker, so a worker's queue holds only connections with a request
    to read.  For our own sockets and for one systemd passes."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
    sock.setblocking(False)


def format_address(host: str, port: int) -> str:
    """host:port as a URL authority, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int, backlog: int, *, reuseport: bool = False,
         listen: bool = True) -> socket.socket:
    """A non-blocking TCP socket bound to host:port, listening unless told not to.

    `reuseport` sets SO_REUSEPORT so several sockets share the port, each with
    its own accept queue (the kernel spreads connections over them by hash).
    """
    family, sockaddr = resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Restarting must not wait for TIME_WAIT connections of the last run.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        if listen:
            sock.listen(backlog)
        defer_accept(sock)
    except OSError as exc:
        sock.close()
        where = format_address(host, port)
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"cannot listen on {where}: address already in use") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ListenError(f"cannot listen on {where}: no such local address") from None
        if exc.errno == errno.EACCES:
            raise ListenError(f"cannot listen on {where}: permission denied") from None
        raise ListenError(f"cannot listen on {where}: {exc.strerror}") from None
    return sock


def parse_admin_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (loopback) -> (host, port); ValueError otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9000)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, [::1]:9000")
    return host or "127.0.0.1", int(port_text)
