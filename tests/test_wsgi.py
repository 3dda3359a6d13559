"""WSGI apps served end to end: Flask, and wsgiref's validator."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import uuid
from pathlib import Path

import pytest

from http_client import Connection, read_until_closed

APPS = str(Path(__file__).parent / "apps")


@pytest.fixture(scope="module")
def flask_server():
    from conftest import Server
    server = Server("--app-dir", APPS, "flask_app:app", "--threads", "4", workers=2)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def request(server, path: str, method: str = "GET", headers: dict | None = None,
            body: bytes = b""):
    with Connection(server.host, server.port) as conn:
        conn.request(path, method=method, body=body,
                     headers={"Connection": "close", **(headers or {})})
        return conn.response()


def test_flask_json_and_routing(flask_server):
    response = request(flask_server, "/items/7?q=x")
    assert response.status == 200
    assert json.loads(response.body) == {"item_id": 7, "q": "x"}
    assert request(flask_server, "/nowhere").status == 404


def test_flask_upload_of_20_mb_streams_through(flask_server):
    body = os.urandom(20 * 1024 * 1024)
    response = request(flask_server, "/upload", method="POST", body=body)
    assert json.loads(response.body) == {"size": len(body),
                                         "sha256": hashlib.sha256(body).hexdigest()}


def test_flask_multipart_upload(flask_server):
    boundary = uuid.uuid4().hex
    content = os.urandom(300_000)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\n"
            f"value\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"data.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    response = request(flask_server, "/form", method="POST", body=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert json.loads(response.body) == {"name": "data.bin", "size": len(content),
                                         "field": "value"}


def test_flask_streamed_response_is_chunked(flask_server):
    with socket.create_connection((flask_server.host, flask_server.port), timeout=30) as sock:
        sock.sendall(b"GET /stream?chunks=4&size=2 HTTP/1.1\r\nHost: t\r\n"
                     b"Connection: close\r\n\r\n")
        data = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"2\r\n00\r\n2\r\n11\r\n2\r\n22\r\n2\r\n33\r\n0\r\n\r\n"


def test_flask_environ(flask_server):
    environ = json.loads(request(flask_server, "/environ?a=b").body)
    assert environ["REQUEST_METHOD"] == "GET"
    assert environ["PATH_INFO"] == "/environ"
    assert environ["QUERY_STRING"] == "a=b"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["SERVER_PORT"] == str(flask_server.port)
    assert environ["HTTP_HOST"] == "test"
    assert environ["url"] == "http://test/environ?a=b"


def test_flask_error_is_500(flask_server):
    before = flask_server.worker_pids()
    assert request(flask_server, "/error").status == 500
    assert flask_server.worker_pids() == before


def test_wsgiref_validator_accepts_the_environ(start_server):
    server = start_server("--app-dir", APPS, "--root-path", "/mount", "validated_wsgi:app",
                          workers=1)
    # The proxy in front strips /mount; the app is told it is mounted there.
    response = request(server, "/p%20q?x=1", method="POST", body=b"payload")
    assert response.status == 200, server.log
    lines = response.body.decode().splitlines()
    assert lines == ["REQUEST_METHOD=POST", "SCRIPT_NAME=/mount", "PATH_INFO=/p q",
                     "QUERY_STRING=x=1", "SERVER_PROTOCOL=HTTP/1.1", "body=payload"]


def test_header_names_with_underscores_are_dropped(flask_server):
    # X_Forwarded_For must not pass for the proxy's X-Forwarded-For.
    environ = json.loads(request(flask_server, "/environ",
                                 headers={"X_Host": "evil"}).body)
    assert environ["HTTP_HOST"] == "test"


def test_write_then_returning_a_list(start_server):
    server = start_server("--app-dir", APPS, "wsgi_edge:app", workers=1)
    assert request(server, "/write-then-list").body == b"hello world"


def test_readline(start_server):
    server = start_server("--app-dir", APPS, "wsgi_edge:app", workers=1)
    body = request(server, "/readline", method="POST", body=b"first\nsecond\nthird").body
    assert body == repr([b"first\n", b"seco", b"nd\n"]).encode()


def test_stop_frees_a_thread_stuck_on_a_client_that_does_not_read(start_server, tmp_path):
    events = tmp_path / "events"
    server = start_server("--app-dir", APPS, "--graceful-timeout", "1", "wsgi_edge:app",
                          workers=1, env={"APP_EVENTS": str(events)})
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: t\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
        server.proc.send_signal(signal.SIGTERM)
        # The worker exits on its own: its thread gave up and closed the iterable.
        assert server.proc.wait(timeout=30) == 0
    assert "endless closed" in events.read_text()
    assert not server.find("Graceful timeout: killing")


def test_a_worker_whose_threads_are_all_busy_gets_no_new_connections(start_server, tmp_path):
    # Round-robin skips only busy workers; one thread each, and one blocked.
    from waiting import wait_until
    events = tmp_path / "events"
    server = start_server("--app-dir", APPS, "--threads", "1", "--policy", "round-robin",
                          "wsgi_edge:app", env={"APP_EVENTS": str(events)})
    with Connection(server.host, server.port) as sleeper:
        sleeper.request("/sleep")
        busy = int(wait_until(lambda: events.exists() and events.read_text().split(),
                              message="the app to sleep")[1])
        served_by = [int(request(server, "/pid").body) for _ in range(8)]
        assert sleeper.response().status == 200
    assert busy not in served_by and len(set(served_by)) == 1



def test_a_request_stuck_in_the_app_does_not_keep_an_orphaned_worker(start_server, tmp_path):
    # The primary dies (kill -9): the worker finishes up, but Python would
    # wait at exit for its pool thread, inside the app for ten minutes.
    from observe import alive
    from waiting import wait_until
    events = tmp_path / "events"
    server = start_server("--app-dir", APPS, "--graceful-timeout", "1", "wsgi_edge:app",
                          workers=1, env={"APP_EVENTS": str(events)})
    [worker] = server.started_workers()
    with Connection(server.host, server.port) as sleeper:
        sleeper.request("/sleep?s=600")
        wait_until(lambda: events.exists() and "sleeping" in events.read_text(),
                   message="the app to sleep")
        os.kill(server.pid, signal.SIGKILL)
        wait_until(lambda: not alive(worker), message="the orphaned worker to exit")
    wait_until(server.output_ended, message="the worker's last lines")
    assert server.find(rf"Worker {worker} leaves 1 WSGI threads inside the application")
    assert "Traceback" not in server.log



@pytest.mark.parametrize("root", ["", "/v%201"])
def test_path_info_keeps_the_target_s_bytes(start_server, root):
    # PEP 3333: bytes as latin-1, whatever they are.  Taken from the
    # UTF-8-decoded ASGI path, /%FF came out as U+FFFD's three bytes.  The
    # --root-path (SCRIPT_NAME) prefixed to the raw path comes off as given,
    # before the target is decoded.
    server = start_server("--app-dir", APPS, "wsgi_edge:app", "--root-path", root, workers=1)
    for target, expected in [(b"/path-info/%FF", b"/path-info/\xff"),
                             (b"/path-info/caf%C3%A9", "/path-info/café".encode()),
                             (b"/path-info/a%2Fb", b"/path-info/a/b")]:
        with socket.create_connection((server.host, server.port), timeout=30) as sock:
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = read_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\n" + expected), data



def test_a_full_pool_reads_as_busy_until_a_thread_is_free():
    # The primary hands nothing to a worker whose pool is full, and counts a
    # pool full for 15 ms as slow work.  Requests finishing while others wait
    # for their threads do not end it: the pool is still full, and what the
    # worker takes meanwhile would wait for a thread.  Only a free thread does.
    import asyncio
    import threading
    import types

    from pyworker.wsgi import WsgiApp

    gates = [threading.Event() for _ in range(3)]

    def app(environ, start_response):
        gates[int(environ["PATH_INFO"][1:])].wait(30)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    marks = []
    wsgi = WsgiApp(app, types.SimpleNamespace(root_path="", threads=2))
    wsgi.watch_load(marks.append)
    answered = []

    async def request(number: int) -> None:
        scope = {"type": "http", "method": "GET", "path": f"/{number}", "query_string": b"",
                 "http_version": "1.1", "scheme": "http", "headers": [],
                 "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 40000 + number)}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.body":
                answered.append(number)

        await wsgi(scope, receive, send)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(request(n)) for n in range(3)]
        deadline = loop.time() + 30
        while wsgi.busy_threads < 3:        # two running, the third waits for a thread
            assert loop.time() < deadline, "3 requests in the pool"
            await asyncio.sleep(0.001)
        assert marks == [True]
        gates[0].set()
        await tasks[0]
        assert marks == [True]              # the third took the thread: full still
        gates[1].set()
        await tasks[1]
        assert marks == [True, False]       # a thread is free
        gates[2].set()
        await tasks[2]
        assert marks == [True, False]

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        for gate in gates:
            gate.set()
        wsgi.stop()
    assert sorted(answered) == [0, 1, 2]
