"""Random bytes and random splits through a real worker: no crash, no hang, no 200 for garbage.

CI runs a short campaign; a longer one is `FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py`.
Every example goes to the same running server, whose workers must all still
be the ones it started with, and which must still answer a plain request.
"""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import app_server

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
TIMEOUT = 10.0

VALID = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /sha256 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /sha256 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /chunked HTTP/1.0\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
]
TOKENS = [b"\r\n", b"\n", b"\r", b" ", b":", b"\x00", b"Content-Length: ", b"Transfer-Encoding: ",
          b"chunked", b"0", b"-1", b"99999999999999999999", b"HTTP/1.1", b"GET", b"\t", b"%",
          b"Upgrade: websocket\r\n", b"Connection: close\r\n", b"\xff", b",", b";"]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    with app_server(tmp_path_factory.mktemp("fuzz") / "events", "edge_asgi:app") as server:
        server.original_workers = server.worker_pids()
        yield server


def exchange(server, chunks: list[bytes]) -> bytes:
    """Send the chunks, then EOF; read until the server closes.  Fails on a hang."""
    received = b""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass    # ENOTCONN: the server has closed already
            while data := sock.recv(65536):
                received += data
        except (ConnectionResetError, BrokenPipeError):
            pass
        except socket.timeout:
            pytest.fail(f"no answer and no close within {TIMEOUT} s for {chunks!r}")
    return received


def healthy(server) -> None:
    assert server.worker_pids() == server.original_workers, server.log[-2000:]
    data = exchange(server, [b"GET /alive HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"])
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"/alive")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_garbage_is_never_answered_200(fuzz_server, garbage, cuts):
    # A lowercase first byte is no HTTP method: whatever follows, not a request.
    data = b"x" + garbage
    received = exchange(fuzz_server, split(data, cuts))
    assert b" 200 " not in received.split(b"\r\n", 1)[0]
    if received:
        assert received.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ", b"HTTP/1.1 408 "))


@FUZZ
@given(base=st.sampled_from(VALID), position=st.integers(0, 200),
       insert=st.lists(st.sampled_from(TOKENS) | st.binary(max_size=8), max_size=4),
       delete=st.integers(0, 6), cuts=st.lists(st.integers(0, 300), max_size=8),
       repeat=st.integers(1, 3))
def test_mutated_requests_never_crash_or_hang(fuzz_server, base, position, insert, delete,
                                              cuts, repeat):
    position %= len(base) + 1
    data = (base[:position] + b"".join(insert) + base[position + delete:]) * repeat
    received = exchange(fuzz_server, split(data, cuts))
    # Every answer is a well-formed status line, and there are no more of them
    # than requests that could have been in the bytes.
    statuses = received.count(b"HTTP/1.1 ")
    assert statuses <= data.count(b"HTTP/1.") + 1


def test_the_server_survived_the_fuzzing(fuzz_server):
    healthy(fuzz_server)
    assert "Traceback" not in fuzz_server.log, fuzz_server.log[-3000:]
