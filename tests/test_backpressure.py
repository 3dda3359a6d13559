"""Flow control under apps, ASGI and WSGI alike: a slow reader and an upload the app holds.

A worker must not buffer what the app has not asked for (an upload) or the
client has not taken (a response).  The clients here watch the worker's
resident memory while they push, so buffering shows up as growth whichever
test ran in that worker before.
"""

from __future__ import annotations

import hashlib
import re
import select
import socket
import time
from pathlib import Path

import pytest

from conftest import app_server

BLOCK = bytes(range(256)) * 4096    # 1 MB of a known pattern


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def worker_pid(sock: socket.socket) -> int:
    """Ask the app which worker serves this connection (its /pid route)."""
    sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
    return int(read_response(sock).rpartition(b"\r\n\r\n")[2])


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    length = int(re.search(rb"(?i)content-length: (\d+)", data).group(1))
    while len(data.partition(b"\r\n\r\n")[2]) < length:
        data += sock.recv(65536)
    return data


def read_slowly(sock: socket.socket, path: bytes, size: int) -> tuple[int, int]:
    """GET `path` (a `size`-byte response), reading the first 4 MB at 64 KB per
    10 ms and the rest at full speed.  Returns (bytes read, the worker's RSS
    growth in KB, largest seen while reading slowly)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    pid = worker_pid(sock)
    before = peak = rss_kb(pid)
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
    total = 0
    while total < 4 << 20:
        total += len(sock.recv(65536))
        peak = max(peak, rss_kb(pid))
        time.sleep(0.01)
    while total < size and (data := sock.recv(1 << 20)):
        total += len(data)
    return total, peak - before


def held_upload(sock: socket.socket, size: int, release: Path) -> tuple[int, int, bytes]:
    """POST `size` bytes to /hold?release=..., whose app takes nothing more
    until `release` exists.  Writes until nothing more is taken for 2 s (or,
    were reading not paused, the whole body), then releases the app and sends
    the rest.  Returns (bytes taken while held, the worker's RSS growth in KB
    meanwhile, the response)."""
    pid = worker_pid(sock)
    before = rss_kb(pid)
    sock.sendall(b"POST /hold?release=%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                 % (str(release).encode(), size))
    sock.setblocking(False)
    sent = 0
    while sent < size and select.select([], [sock], [], 2)[1]:
        try:
            sent += sock.send(BLOCK[sent % len(BLOCK):][:size - sent])
        except BlockingIOError:
            pass
    held, grown = sent, rss_kb(pid) - before
    release.touch()
    sock.setblocking(True)
    sock.settimeout(30)
    while sent < size:
        sent += sock.send(BLOCK[sent % len(BLOCK):][:size - sent])
    return held, grown, read_response(sock)


def pattern_digest(size: int) -> str:
    """sha256 of `size` bytes of BLOCK repeated (size a multiple of 1 MB)."""
    digest = hashlib.sha256()
    for _ in range(size // len(BLOCK)):
        digest.update(BLOCK)
    return digest.hexdigest()


# Each app has /pid, /hold?release= and a 64 KB-chunked large response.
APPS = {"asgi": ("edge_asgi:app", b"/large-stream?chunks=%d"),
        "wsgi": ("wsgi_edge:app", b"/large?chunks=%d")}


@pytest.fixture(scope="module", params=list(APPS))
def served(request, tmp_path_factory):
    app, large = APPS[request.param]
    with app_server(tmp_path_factory.mktemp(request.param) / "events", "--threads", "2", app,
                    workers=1) as server:
        yield server, large


def test_slow_reader_does_not_make_the_worker_buffer_the_response(served):
    # ASGI: `send` waits for room.  WSGI: the app's thread waits for room
    # before it takes the next chunk of the generator.
    server, large = served
    chunks = 1024    # 64 MB
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        total, grown = read_slowly(sock, large % chunks, chunks * 65536)
    assert total >= chunks * 65536
    assert grown < 16 * 1024, f"the worker's RSS grew {grown} KB for a slow reader"


def test_an_upload_the_app_does_not_take_stalls_instead_of_filling_the_worker(served, tmp_path):
    # Reading pauses while the app has not taken what is buffered: the client's
    # writes stall once the kernel's buffers are full, the worker holds no more.
    server, _ = served
    size = 128 << 20
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        held, grown, response = held_upload(sock, size, tmp_path / "release")
    assert held < size // 2, f"the worker took {held} of {size} bytes the app never asked for"
    assert grown < 16 * 1024, f"the worker's RSS grew {grown} KB for an upload it held"
    assert response.endswith(b"%d %s" % (size, pattern_digest(size).encode())), response[-200:]
