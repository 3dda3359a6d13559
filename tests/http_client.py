"""A raw HTTP/1.x client for tests: exact bytes out, responses parsed one by one.

http.client hides what these tests check (pipelining, what the server sends
before it closes), so requests are written as bytes and responses read from
one buffered stream.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass, field

TIMEOUT = 30.0
PID = re.compile(rb"Hello from Worker (\d+)")


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def pid(self) -> int:
        match = PID.match(self.body)
        assert match, f"not a hello body: {self.body!r}"
        return int(match.group(1))


class Connection:
    def __init__(self, host: str, port: int, timeout: float = TIMEOUT,
                 tls: ssl.SSLContext | None = None) -> None:
        """`tls`: speak HTTPS, checking the server's certificate for `localhost`."""
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.stream = self.sock.makefile("rb")

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.stream.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, path: str = "/", method: str = "GET", version: str = "1.1",
                headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        lines = [f"{method} {path} HTTP/{version}", "Host: test"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def response(self, head: bool = False) -> Response:
        status_line = self.stream.readline()
        if not status_line:
            raise ConnectionError("connection closed before a response")
        version, status, _ = status_line.decode().split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        while True:
            line = self.stream.readline().decode()
            if line in ("\r\n", ""):
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if not head and headers.get("transfer-encoding") == "chunked":
            return Response(int(status), headers, self.read_chunked())
        length = 0 if head else int(headers.get("content-length", 0))
        body = self.stream.read(length)
        assert len(body) == length, "truncated body"
        return Response(int(status), headers, body)

    def read_chunked(self) -> bytes:
        body = b""
        while size := int(self.stream.readline().split(b";")[0], 16):
            chunk = self.stream.read(size)
            assert len(chunk) == size and self.stream.readline() == b"\r\n", "truncated chunk"
            body += chunk
        assert self.stream.readline() == b"\r\n", "no end after the last chunk"
        return body

    def closed_by_server(self) -> bool:
        """True once the server has closed its side (reads EOF)."""
        try:
            return self.stream.read(1) == b""
        except ConnectionResetError:
            return True


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sent until it closed the connection.

    A reset ends it too (the server closed with bytes of ours unread, so the
    kernel reset): what came before it is returned.
    """
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def body_of(response: bytes) -> bytes:
    """The body of a whole response read off a socket, which must be a 200."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), response
    return body


def get(host: str, port: int, path: str = "/", **kwargs) -> Response:
    """One request on a new connection."""
    with Connection(host, port) as conn:
        conn.request(path, headers={"Connection": "close"}, **kwargs)
        return conn.response()
