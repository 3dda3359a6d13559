"""WebSockets through the real CLI, driven by the `websockets` package's client."""

from __future__ import annotations

import json
import signal
import socket

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from conftest import APPS, app_server
from http_client import read_until_closed
from waiting import wait_until

TIMEOUT = 30


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """One server for the raw ASGI app, shared by this module's tests."""
    with app_server(tmp_path_factory.mktemp("edge") / "events", "--ws-max-size", "65536", "edge_asgi:app") as server:
        yield server


def url(server, path: str) -> str:
    return f"ws://{server.host}:{server.port}{path}"


def events(server) -> list[str]:
    return server.events.read_text().splitlines() if server.events.exists() else []


def test_text_and_binary_messages_echo(edge):
    with connect(url(edge, "/ws"), open_timeout=TIMEOUT) as ws:
        ws.send("hello")
        assert ws.recv(TIMEOUT) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(TIMEOUT) == b"\x00\x01binary"
        big = "x" * 60000     # fragmented by nobody, but over one read
        ws.send(big)
        assert ws.recv(TIMEOUT) == big


def test_ping_is_answered(edge):
    with connect(url(edge, "/ws"), open_timeout=TIMEOUT) as ws:
        assert ws.ping(b"are you there").wait(TIMEOUT)


def test_app_close_code_reaches_the_client(edge):
    with connect(url(edge, "/ws-close"), open_timeout=TIMEOUT) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(TIMEOUT)
    assert closed.value.rcvd.code == 4001
    assert closed.value.rcvd.reason == "done here"


def test_client_close_code_reaches_the_app(edge):
    with connect(url(edge, "/ws"), open_timeout=TIMEOUT) as ws:
        ws.send("hi")
        ws.recv(TIMEOUT)
        ws.close(code=4321)
    wait_until(lambda: "ws disconnect 4321" in events(edge), message="the app's disconnect")


def test_client_that_vanishes_is_an_abnormal_closure(edge):
    ws = connect(url(edge, "/ws"), open_timeout=TIMEOUT).__enter__()
    ws.send("hi")
    ws.recv(TIMEOUT)
    ws.socket.shutdown(socket.SHUT_RDWR)   # no close frame
    ws.socket.close()
    wait_until(lambda: "ws disconnect 1006" in events(edge), message="a 1006 disconnect")


def test_message_over_ws_max_size_closes_with_1009(edge):
    with connect(url(edge, "/ws"), open_timeout=TIMEOUT, max_size=None) as ws:
        ws.send(b"y" * 70000)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(TIMEOUT)
    assert closed.value.rcvd.code == 1009


def test_app_that_refuses_gets_403(edge):
    with pytest.raises(InvalidStatus) as refused:
        connect(url(edge, "/ws-deny"), open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 403


def test_app_that_raises_before_accepting_gets_500(edge):
    with pytest.raises(InvalidStatus) as refused:
        connect(url(edge, "/ws-raise"), open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 500


def test_app_that_raises_later_closes_with_1011(edge):
    with connect(url(edge, "/ws"), open_timeout=TIMEOUT) as ws:
        ws.send("raise")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(TIMEOUT)
    assert closed.value.rcvd.code == 1011


def test_subprotocol_and_scope(edge):
    with connect(url(edge, "/ws-scope?x=1"), open_timeout=TIMEOUT,
                 subprotocols=["chat.v2", "chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v2"
        scope = ws.recv(TIMEOUT)
    assert "'scheme': 'ws'" in scope and "'path': '/ws-scope'" in scope
    assert "'query_string': b'x=1'" in scope and "['chat.v2', 'chat.v1']" in scope



@pytest.mark.parametrize("proto, scheme", [("wss", "wss"), ("https", "wss"), ("ws", "ws")])
def test_a_trusted_proxy_s_websocket_scheme_is_the_scope_s(edge, proto, scheme):
    # Traefik says wss (or ws) on WebSocket upgrades, others https: each is
    # the scheme the client used.
    with connect(url(edge, "/ws-scope"), open_timeout=TIMEOUT,
                 additional_headers={"X-Forwarded-Proto": proto}) as ws:
        scope = ws.recv(TIMEOUT)
    assert f"'scheme': '{scheme}'" in scope



@pytest.mark.parametrize("headers", [
    {"Cookie": "session=" + "a" * 9000},                    # one line past 8 KB
    {f"X-Field-{n}": "v" for n in range(200)},              # past 128 fields
], ids=["a-long-cookie", "many-fields"])
def test_an_upgrade_takes_the_head_plain_http_takes(edge, headers):
    # websockets parses the handshake again with tighter limits of its own.
    with connect(url(edge, "/ws"), open_timeout=TIMEOUT, additional_headers=headers) as ws:
        ws.send("hello")
        assert ws.recv(TIMEOUT) == "hello"


def test_refused_handshakes_do_not_fill_the_worker_s_queue(start_server):
    # Each refused handshake once left a place taken in the worker's queue;
    # with the queue full, the worker stopped taking connections for good.
    server = start_server("--app-dir", APPS, "edge_asgi:app", "--queue-depth", "1",
                          workers=1)
    bad = (b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")
    for _ in range(4):
        with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
            sock.sendall(bad)
            assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /plain HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert read_until_closed(sock).endswith(b"/plain")


def test_plain_http_still_works_after_websockets(edge):
    with socket.create_connection((edge.host, edge.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /plain HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert sock.recv(65536).endswith(b"/plain")


def test_fastapi_websocket(start_server):
    server = start_server("--app-dir", APPS, "fastapi_app:app", workers=1)
    with connect(url(server, "/ws"), open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"n": 1}))
        assert json.loads(ws.recv(TIMEOUT))["echo"] == {"n": 1}


def close_code_after_a_stop(server, ws) -> int:
    """SIGTERM with `ws` open: the close code it gets (at --graceful-timeout)."""
    server.proc.send_signal(signal.SIGTERM)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(TIMEOUT)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code


def test_draining_worker_closes_websockets_with_1001(start_server):
    server = start_server("--app-dir", APPS, "--graceful-timeout", "1", "edge_asgi:app",
                          workers=1)
    with connect(url(server, "/ws"), open_timeout=TIMEOUT) as ws:
        ws.send("before")
        assert ws.recv(TIMEOUT) == "before"
        assert close_code_after_a_stop(server, ws) == 1001
    assert server.proc.wait(timeout=TIMEOUT) == 0


def test_a_websocket_open_at_the_graceful_timeout_still_lets_the_app_shut_down(
        start_server, tmp_path):
    # The 1001 closes the socket as the loop stops; the app's lifespan
    # shutdown runs after.  The close's callbacks, reaching the worker during
    # that shutdown, once stopped the loop under it: a traceback, exit code
    # 3, and the app's shutdown cut off.
    events = tmp_path / "events"
    server = start_server("--app-dir", APPS, "--graceful-timeout", "1", "fastapi_app:app",
                          workers=1, env={"LIFESPAN_EVENTS": str(events)})
    with connect(url(server, "/ws"), open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps("before"))
        assert json.loads(ws.recv(TIMEOUT))["echo"] == "before"
        assert close_code_after_a_stop(server, ws) == 1001
    assert server.proc.wait(timeout=TIMEOUT) == 0
    server.kill()       # reads the log to its end
    assert [line.split()[1] for line in events.read_text().splitlines()] == [
        "startup", "shutdown"], server.log
    assert "Traceback" not in server.log and "cannot start" not in server.log
    # websockets' own "connection open" lines name nothing: --log-level debug only.
    assert "connection open" not in server.log
    assert server.find(r"Worker \d+ exited \(exit code 0\)")


def test_wsgi_app_answers_an_upgrade_as_plain_http(start_server):
    server = start_server("cydispatch.bench.apps:hello_wsgi", workers=1)
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ") and b"Hello from Worker" in data


HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
# A masked ping with the payload "p" (mask 0).
PING = b"\x89\x81\x00\x00\x00\x00p"


def test_frames_right_behind_the_handshake_wait_for_the_101(edge):
    with socket.create_connection((edge.host, edge.port), timeout=TIMEOUT) as sock:
        sock.sendall(HANDSHAKE + PING)
        data = b""
        while b"\x8a\x01p" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 101 ")
    assert data.index(b"\r\n\r\n") < data.index(b"\x8a\x01p")


@pytest.mark.parametrize("bad, status", [
    (b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"),
    (b"dGhlIHNhbXBsZSBub25jZQ==", b"short"),
])
def test_a_bad_handshake_is_refused_without_bothering_the_app(edge, bad, status):
    app_errors = len(edge.find("exception in the application"))
    with socket.create_connection((edge.host, edge.port), timeout=TIMEOUT) as sock:
        sock.sendall(HANDSHAKE.replace(bad, status))
        data = read_until_closed(sock)
    assert data.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 426 ")), data
    assert len(edge.find("exception in the application")) == app_errors


def test_an_app_that_keeps_sending_after_the_client_closed_gets_an_oserror(start_server,
                                                                         tmp_path):
    events_file = tmp_path / "events"
    server = start_server("--app-dir", APPS, "--log-level", "debug", "edge_asgi:app",
                          workers=1, env={"APP_EVENTS": str(events_file)})
    with connect(url(server, "/ws-spam"), open_timeout=TIMEOUT) as ws:
        assert ws.recv(TIMEOUT) == "spam"
    # The worker's verdict on how the app ended is logged either way: wait for it.
    server.wait_for_log(r"WebSocket app ended on a closed connection|exception in the application")
    assert "spam stopped by ConnectionResetError" in events_file.read_text()
    assert not server.find("exception in the application")
