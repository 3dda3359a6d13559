"""The HTTP layer, as a client sees it: one dispatch-mode server for the module.

The worker code is the same in every mode; test_serve.py checks the modes.
"""

from __future__ import annotations

import pytest

from http_client import Connection, get


@pytest.fixture
def conn(dispatch_server):
    with Connection(dispatch_server.host, dispatch_server.port) as conn:
        yield conn


def test_hello_names_the_worker(dispatch_server):
    response = get(dispatch_server.host, dispatch_server.port)
    assert response.status == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.pid in dispatch_server.started_workers()
    assert int(response.headers["content-length"]) == len(response.body)
    assert "date" in response.headers


def test_keep_alive_serves_several_requests_on_one_connection(conn):
    pids = set()
    for _ in range(5):
        conn.request("/")
        response = conn.response()
        assert response.status == 200
        assert "connection" not in response.headers
        pids.add(response.pid)
    assert len(pids) == 1, "one connection is served by one worker"


def test_pipelined_requests_are_answered_in_order(conn):
    conn.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
              b"GET /missing HTTP/1.1\r\nHost: t\r\n\r\n"
              b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n"
              b"GET /slow?ms=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    first = conn.response()
    assert first.status == 200 and first.body.startswith(b"Hello from Worker")
    assert conn.response().status == 404
    head = conn.response(head=True)
    assert head.status == 200 and int(head.headers["content-length"]) == len(first.body)
    last = conn.response()
    assert last.status == 200 and last.body.endswith(b"after 1 ms of work")


def test_connection_close_is_honoured(conn):
    conn.request("/", headers={"Connection": "close"})
    response = conn.response()
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert conn.closed_by_server()


def test_http10_closes_unless_asked_to_keep_alive(dispatch_server):
    with Connection(dispatch_server.host, dispatch_server.port) as conn:
        conn.request("/", version="1.0")
        assert conn.response().status == 200
        assert conn.closed_by_server()
    with Connection(dispatch_server.host, dispatch_server.port) as conn:
        conn.request("/", version="1.0", headers={"Connection": "keep-alive"})
        response = conn.response()
        assert response.headers["connection"] == "keep-alive"
        conn.request("/", version="1.0", headers={"Connection": "keep-alive"})
        assert conn.response().status == 200


def test_head_sends_headers_only(conn):
    conn.request("/", method="HEAD")
    response = conn.response(head=True)
    assert response.status == 200
    assert int(response.headers["content-length"]) > 0
    conn.request("/")   # the next response starts right after the head's headers
    assert conn.response().status == 200


def test_unknown_path_is_404_and_the_connection_stays(conn):
    conn.request("/nope")
    assert conn.response().status == 404
    conn.request("/")
    assert conn.response().status == 200


def test_other_methods_are_405_with_allow(conn):
    conn.request("/", method="POST", body=b"x" * 1000)
    response = conn.response()
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"
    conn.request("/")   # the body was read and discarded; the next request parses
    assert conn.response().status == 200


def test_slow_burns_the_asked_time_capped_at_a_second(dispatch_server):
    response = get(dispatch_server.host, dispatch_server.port, "/slow?ms=30")
    assert response.body.endswith(b"after 30 ms of work")
    capped = get(dispatch_server.host, dispatch_server.port, "/slow?ms=99999")
    assert capped.body.endswith(b"after 1000 ms of work")


@pytest.mark.parametrize("query", ["", "?ms=", "?ms=-5", "?ms=fast"])
def test_slow_without_a_valid_ms_is_400(dispatch_server, query):
    response = get(dispatch_server.host, dispatch_server.port, "/slow" + query)
    assert response.status == 400


def assert_still_serving(server):
    assert get(server.host, server.port).status == 200
    assert not server.find("died"), server.log


@pytest.mark.parametrize("garbage", [
    b"garbage\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    b"\x00\x01\x02\x03\r\n\r\n",
])
def test_malformed_request_is_400_then_closed(dispatch_server, conn, garbage):
    conn.send(garbage)
    response = conn.response()
    assert response.status == 400
    assert response.headers["connection"] == "close"
    assert conn.closed_by_server()
    assert_still_serving(dispatch_server)


def test_oversized_head_in_one_piece_is_431(dispatch_server, conn):
    conn.request("/", headers={"X-Big": "a" * 70_000})
    response = conn.response()
    assert response.status == 431
    assert conn.closed_by_server()
    assert_still_serving(dispatch_server)


def test_endless_head_is_431_before_it_ends(dispatch_server, conn):
    conn.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
    for _ in range(100):                    # 100 KB of headers, never finished
        try:
            conn.send(b"X-Filler: " + b"b" * 1000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break                           # the server already answered and closed
    assert conn.response().status == 431
    assert_still_serving(dispatch_server)


def test_endless_trailer_is_431_before_it_ends(dispatch_server, conn):
    conn.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n0\r\nX-Trailer: ")
    for _ in range(200):                    # 200 KB of one trailer, never finished
        try:
            conn.send(b"a" * 1000)
        except (BrokenPipeError, ConnectionResetError):
            break
    assert conn.response().status == 431
    assert_still_serving(dispatch_server)


def test_oversized_body_is_413(dispatch_server, conn):
    conn.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000000\r\n\r\n")
    try:
        conn.send(b"z" * 2_000_000)
    except (BrokenPipeError, ConnectionResetError):
        pass                                # it may close before all of it arrives
    assert conn.response().status == 413
    assert_still_serving(dispatch_server)


def test_upgrade_is_answered_then_closed(conn):
    conn.request("/", headers={"Connection": "Upgrade", "Upgrade": "websocket"})
    response = conn.response()
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert conn.closed_by_server()
