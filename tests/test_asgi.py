"""ASGI apps served end to end: the real CLI, real sockets, a raw ASGI app and FastAPI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import signal
import socket
import time

import pytest

from http_client import Connection, get, read_until_closed
from conftest import APPS, app_server, serving
from waiting import wait_until


def serve(start_server, app: str, *args: str, **kwargs):
    return start_server("--app-dir", APPS, *args, app, **kwargs)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """One server for the raw ASGI app, shared by this module's tests."""
    with app_server(tmp_path_factory.mktemp("edge") / "events", "edge_asgi:app") as server:
        yield server


@pytest.fixture(scope="module")
def fastapi_server():
    with serving("--app-dir", APPS, "fastapi_app:app") as server:
        yield server


def connect(server) -> Connection:
    return Connection(server.host, server.port)


def request(server, path: str, method: str = "GET", headers: dict | None = None, **kwargs):
    with connect(server) as conn:
        conn.request(path, method=method, headers={"Connection": "close", **(headers or {})},
                     **kwargs)
        return conn.response(head=method == "HEAD")


def raw(server, data: bytes) -> bytes:
    """Send bytes, read everything until the server closes."""
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


# FastAPI

def test_fastapi_json_path_and_query(fastapi_server):
    response = request(fastapi_server, "/items/42?q=caf%C3%A9")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.body) == {"item_id": 42, "q": "café"}
    assert request(fastapi_server, "/items/notanumber").status == 422
    assert request(fastapi_server, "/nowhere").status == 404


def test_fastapi_sync_route_runs_in_its_thread_pool(fastapi_server):
    assert json.loads(request(fastapi_server, "/sync").body)["thread"] is True


def test_lifespan_state_reaches_every_request(fastapi_server):
    # Connections held open together: least-conn spreads them over both
    # workers (one after another, every one could go to the same worker).
    # On a loaded machine a worker can look busy for a moment, and the primary
    # passes it over: connections are opened until both workers have answered.
    pids = set()

    def both_answered(held: contextlib.ExitStack) -> bool:
        conn = held.enter_context(connect(fastapi_server))
        conn.request("/state")
        body = json.loads(conn.response().body)
        # Each worker ran its own startup and sees its own state.
        assert body["started_by"] == body["pid"]
        pids.add(body["pid"])
        return len(pids) == 2

    with contextlib.ExitStack() as held:
        wait_until(lambda: both_answered(held), interval=0.1,
                   message="both workers to answer /state")


def test_scope_is_complete(fastapi_server):
    response = request(fastapi_server, "/scope?a=1&b=%20", headers={"X-Custom": "Value"})
    scope = json.loads(response.body)
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/scope"
    assert scope["raw_path"] == "/scope"
    assert scope["query_string"] == "a=1&b=%20"
    assert scope["root_path"] == ""
    assert scope["client"][0] == "127.0.0.1" and scope["client"][1] > 0
    assert scope["server"] == ["127.0.0.1", fastapi_server.port]
    assert ["x-custom", "Value"] in scope["headers"]
    assert all(name == name.lower() for name, _ in scope["headers"])


def test_percent_encoded_path_is_decoded(fastapi_server):
    response = request(fastapi_server, "/items/%34%32")
    assert json.loads(response.body)["item_id"] == 42


def test_upload_of_20_mb_streams_through(fastapi_server):
    body = os.urandom(20 * 1024 * 1024)
    response = request(fastapi_server, "/upload", method="POST", body=body)
    assert response.status == 200
    assert json.loads(response.body) == {"size": len(body),
                                         "sha256": hashlib.sha256(body).hexdigest()}


def test_streaming_request_and_response(fastapi_server):
    body = b"0123456789" * 10000
    response = request(fastapi_server, "/echo", method="POST", body=body)
    assert response.status == 200
    with connect(fastapi_server) as conn:
        conn.request("/stream?chunks=5&size=3")
        head = conn.stream.readline() + b"".join(iter(conn.stream.readline, b"\r\n"))
        assert b"transfer-encoding: chunked" in head.lower()
        chunks = []
        while (size := int(conn.stream.readline(), 16)):
            chunks.append(conn.stream.read(size))
            assert conn.stream.readline() == b"\r\n"
        assert conn.stream.readline() == b"\r\n"
        assert b"".join(chunks) == b"000111222333444"
        # Still usable: the chunked response ended cleanly.
        conn.request("/items/1")
        assert conn.response().status == 200


def test_fastapi_error_is_500_and_the_worker_lives(fastapi_server):
    before = fastapi_server.worker_pids()
    for _ in range(4):
        assert request(fastapi_server, "/error").status == 500
    assert fastapi_server.worker_pids() == before
    assert request(fastapi_server, "/").status == 200


# The raw app: framing, errors, disconnects

def test_small_response_gets_content_length_and_keeps_alive(edge):
    with connect(edge) as conn:
        for path in ("/a", "/b", "/c"):
            conn.request(path)
            response = conn.response()
            assert response.body == path.encode()
            assert response.headers["content-length"] == str(len(path))
            assert "date" in response.headers and response.headers["server"] == "cydispatch"


def test_pipelined_requests_are_answered_in_order(edge):
    with connect(edge) as conn:
        conn.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(5)))
        assert [conn.response().body for _ in range(5)] == [b"/%d" % i for i in range(5)]


def test_pipelined_request_waits_for_a_slow_one(edge):
    with connect(edge) as conn:
        conn.send(b"GET /sleep?s=0.3 HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.response().body == b"/sleep"
        assert conn.response().body == b"/after"


def test_each_request_runs_in_a_task_and_a_context_of_its_own(edge):
    # However a request is started (on Python 3.12 and later its first step
    # runs at once, while the connection's bytes are being handled), the app
    # finds a current task, and a context that no earlier request changed.
    with connect(edge) as conn:
        conn.request("/context?mark=first")
        assert conn.response().body == b"task=yes seen=- body="
        conn.request("/context?mark=second", method="POST", body=b"in one packet")
        assert conn.response().body == b"task=yes seen=- body=in one packet"
        conn.send(b"GET /context?mark=a HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /context?mark=b HTTP/1.1\r\nHost: t\r\n\r\n")
        assert [conn.response().body for _ in range(2)] == [b"task=yes seen=- body="] * 2


def test_each_request_is_read_as_the_version_it_names(edge):
    # The version is inferred from keep-alive when no Connection header is
    # sent (see on_headers_complete): every combination, on one connection
    # until the last request of each, which closes it.
    for requests in (
        [("1.1", {}, True),
         ("1.0", {"Connection": "keep-alive"}, True),
         ("1.1", {"Connection": "keep-alive"}, True),
         ("1.0", {"Connection": "Keep-Alive", "Keep-Alive": "5"}, True),
         ("1.1", {"Keep-Alive": "5"}, True),
         # llhttp reads Proxy-Connection as Connection.
         ("1.0", {"Proxy-Connection": "keep-alive"}, True),
         ("1.0", {}, False)],
        [("1.1", {"Proxy-Connection": "close"}, False)],
    ):
        with connect(edge) as conn:
            for version, headers, keeps_alive in requests:
                conn.request("/version", version=version, headers=headers)
                response = conn.response()
                assert response.body == version.encode()
                connection = response.headers.get("connection", "")
                assert connection == ("" if version == "1.1" and keeps_alive else
                                      "keep-alive" if keeps_alive else "close")
            assert conn.closed_by_server()


def test_head_gets_no_body(edge):
    with connect(edge) as conn:
        conn.request("/something", method="HEAD")
        response = conn.response(head=True)
        assert response.status == 200
        assert response.headers["content-length"] == "10"
        conn.request("/next")   # nothing of a body was left on the connection
        assert conn.response().body == b"/next"


def test_chunked_when_the_app_gives_no_length(edge):
    data = raw(edge, b"GET /chunked HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"4\r\none \r\n4\r\ntwo \r\n5\r\nthree\r\n0\r\n\r\n"


def test_http10_client_gets_a_close_delimited_stream(edge):
    data = raw(edge, b"GET /chunked HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"chunked" not in head and b"Connection: close" in head
    assert body == b"one two three"


def test_expect_100_continue_is_answered_when_the_app_reads(edge):
    with socket.create_connection((edge.host, edge.port), timeout=30) as sock:
        sock.sendall(b"POST /sha256 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b"5 " + hashlib.sha256(b"hello").hexdigest().encode())


def test_chunked_request_body(edge):
    with connect(edge) as conn:
        conn.send(b"POST /sha256 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert conn.response().body == b"5 " + hashlib.sha256(b"abcde").hexdigest().encode()


def test_a_body_the_app_ignores_does_not_break_the_connection(edge):
    with connect(edge) as conn:
        conn.request("/ignore-body", method="POST", body=b"z" * 200_000)
        assert conn.response().body == b"ignored"
        conn.request("/after")
        assert conn.response().body == b"/after"


@pytest.mark.parametrize("path", ["/raise-before", "/no-response", "/exit", "/bad-header"])
def test_app_failure_before_the_response_is_500(edge, path):
    before = edge.worker_pids()
    data = raw(edge, f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 500 "), data
    assert b"Connection: close" in data and b"Set-Cookie" not in data
    assert edge.worker_pids() == before
    assert request(edge, "/alive").body == b"/alive"


def test_app_failure_during_the_response_closes_the_connection(edge):
    data = raw(edge, b"GET /raise-after HTTP/1.1\r\nHost: t\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    # Chunked and never terminated: the client can tell it is incomplete.
    assert body == b"7\r\npartial\r\n"
    assert request(edge, "/alive").body == b"/alive"


def events(server) -> list[str]:
    return server.events.read_text().splitlines() if server.events.exists() else []


def test_app_learns_that_the_client_went_away(edge):
    with socket.create_connection((edge.host, edge.port), timeout=30) as sock:
        sock.sendall(b"GET /wait-disconnect HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: "waiting" in events(edge), message="the app to wait")
    wait_until(lambda: "http.disconnect" in events(edge), message="http.disconnect")


def test_a_stream_to_a_client_that_left_stops(edge):
    with socket.create_connection((edge.host, edge.port), timeout=30) as sock:
        sock.sendall(b"GET /stream-forever HTTP/1.1\r\nHost: t\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    wait_until(lambda: any(e.startswith("stopped after") for e in events(edge)),
               message="the app's send to fail")


# Request smuggling and malformed input: 400, then close

SMUGGLING = {
    "content-length and transfer-encoding":
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two content-lengths":
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "content-length list": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 3\r\n\r\nabc",
    "signed content-length": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
    "transfer-encoding not chunked":
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "chunked not last":
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n",
    "bare LF line ends": b"GET / HTTP/1.1\nHost: t\n\n",
    "bare LF after a header": b"GET / HTTP/1.1\r\nHost: t\nX: y\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n",
    "space in a name": b"GET / HTTP/1.1\r\nHost: t\r\nX Y: a\r\n\r\n",
    "space before the colon": b"GET / HTTP/1.1\r\nHost : t\r\n\r\n",
    "bare LF in a chunk size":
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
    "chunk longer than its size":
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
    "non-ASCII in the target": b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: t\r\n\r\n",
    # Which site?  A proxy and the app could each take another (RFC 9112, 3.2).
    "two hosts": b"GET / HTTP/1.1\r\nHost: good\r\nHost: evil\r\n\r\n",
    "a fragment in the target": b"GET /a#b HTTP/1.1\r\nHost: t\r\n\r\n",
}


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_shapes_are_refused(edge, name):
    data = raw(edge, SMUGGLING[name] + b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert b"/smuggled" not in data and data.count(b"HTTP/1.1") == 1




@pytest.mark.parametrize("codings", [
    [b"gzip, chunked"], [b"gzip", b"chunked"], [b"identity, chunked"]])
def test_a_transfer_coding_before_chunked_is_501(edge, codings):
    # Only chunked is served: the body would reach the app still coded,
    # with nothing to say so (RFC 9112, 6.1).
    fields = b"".join(b"Transfer-Encoding: " + c + b"\r\n" for c in codings)
    data = raw(edge, b"POST /sha256 HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n"
                     b"3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 501 ") and b"/smuggled" not in data, data


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
def test_a_request_without_a_host_is_served(edge, version):
    # RFC 9112 asks HTTP/1.1 to send one, but uvicorn and gunicorn serve
    # requests without, and health checks written by hand (HAProxy's older
    # `option httpchk GET / HTTP/1.1`) send none: nothing is ambiguous here.
    data = raw(edge, b"GET /host HTTP/" + version + b"\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"[]")


@pytest.mark.parametrize("target, host", [
    (b"http://evil.example/host", b"evil.example"),
    (b"http://[::1]:8080/host", b"[::1]:8080"),
])
def test_an_absolute_target_names_the_host_the_app_sees(edge, target, host):
    # RFC 9112, 3.2.2: the target's authority, not the Host field, names the
    # site; a proxy routes by one, and the app must not read the other.
    data = raw(edge, b"GET " + target + b" HTTP/1.1\r\nHost: good.example\r\n"
                     b"Connection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ")
    assert json.loads(data.partition(b"\r\n\r\n")[2]) == [host.decode()]


def test_oversized_head_is_431(edge):
    data = raw(edge, b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize("path", [b"/sha256", b"/ignore-body"])
def test_an_endless_trailer_is_431_before_it_ends(edge, path):
    # httptools keeps an unfinished trailer field whole, growing with every
    # byte (and its copying with it), before any callback sees it.  An app
    # that answered without reading the body got its answer out first: the
    # connection just closes, with no second response.
    with socket.create_connection((edge.host, edge.port), timeout=30) as sock:
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: t\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: ")
        for _ in range(200):                # 200 KB of one trailer, never finished
            try:
                sock.sendall(b"a" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                break                       # answered and closed already
        data = read_until_closed(sock)
    first = b"HTTP/1.1 431 " if path == b"/sha256" else b"HTTP/1.1 200 "
    assert data.startswith(first) and data.count(b"HTTP/1.1 ") == 1, data


# Slow clients

def test_slowloris_head_gets_408_at_the_header_timeout(start_server):
    server = serve(start_server, "edge_asgi:app", "--header-timeout", "1",
                   "--keepalive-timeout", "30")
    head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        started = time.monotonic()
        answer = b""
        # One byte every 0.1 s: each resets an idle timer, not the deadline.
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.1)
            try:
                answer = sock.recv(1000)
            except socket.timeout:
                continue
            break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert elapsed < 8


# Behind a proxy

@pytest.mark.parametrize("allowed", ["127.0.0.0/8", "10.1.2.3,127.0.0.1", "*"])
def test_forwarded_headers_from_a_network_or_anyone_allowed(start_server, allowed):
    server = serve(start_server, "fastapi_app:app", "--forwarded-allow-ips", allowed,
                   workers=1)
    scope = json.loads(request(server, "/scope", headers={
        "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}).body)
    assert scope["client"][0] == "203.0.113.7"
    assert scope["scheme"] == "https"


def test_forwarded_headers_from_a_trusted_proxy(fastapi_server):
    scope = json.loads(request(fastapi_server, "/scope", headers={
        "X-Forwarded-For": "203.0.113.7, 127.0.0.1", "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "example.com"}).body)
    assert scope["client"][0] == "203.0.113.7"
    assert scope["scheme"] == "https"
    assert scope["url"] == "https://example.com/scope"


@pytest.mark.parametrize("args", [["--forwarded-allow-ips", "10.0.0.0/8"],
                                  ["--no-proxy-headers"]])
def test_forwarded_headers_from_anyone_else_are_ignored(start_server, args):
    server = serve(start_server, "fastapi_app:app", *args, workers=1)
    scope = json.loads(request(server, "/scope", headers={
        "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}).body)
    assert scope["client"][0] == "127.0.0.1"
    assert scope["scheme"] == "http"


def test_root_path(start_server):
    server = serve(start_server, "fastapi_app:app", "--root-path", "/api", workers=1)
    scope = json.loads(request(server, "/scope").body)
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/scope"
    assert scope["url"].endswith("/api/scope")


def test_access_log(start_server):
    server = serve(start_server, "edge_asgi:app", "--access-log", workers=1)
    request(server, "/logged?x=1")
    line = server.wait_for_log(r'"GET /logged\?x=1 HTTP/1.1" 200')[0].string
    assert "127.0.0.1:" in line and "ms" in line


def test_no_access_log_by_default(edge):
    request(edge, "/unlogged")
    assert not edge.find("/unlogged")


# Lifespan

def test_lifespan_runs_before_ready_and_shutdown_on_stop(start_server, tmp_path):
    log = tmp_path / "events"
    server = serve(start_server, "fastapi_app:app", env={"LIFESPAN_EVENTS": str(log)})
    pids = set(server.started_workers())
    started = {line.split()[0] for line in log.read_text().splitlines()
               if line.split()[1] == "startup"}
    # Startup had finished in every worker before the primary logged it ready.
    assert started == {str(pid) for pid in pids}
    server.stop()
    shut = {line.split()[0] for line in log.read_text().splitlines()
            if line.split()[1] == "shutdown"}
    assert shut == {str(pid) for pid in pids}


def test_lifespan_order_across_a_reload_under_load(start_server, tmp_path):
    from load_client import LoadClient, failures, summary
    log = tmp_path / "events"
    server = serve(start_server, "fastapi_app:app", env={"LIFESPAN_EVENTS": str(log)})
    old = set(server.started_workers())
    with LoadClient(server.host, server.port, threads=6, pause=0) as load:
        wait_until(lambda: load.count("ok") >= 50, message="50 requests before the reload")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"Reload complete: every worker replaced")
        wait_until(lambda: len([l for l in log.read_text().splitlines()
                                if "shutdown" in l]) >= 2,
                   message="the old workers' shutdown")
        reloaded = time.monotonic()
        wait_until(lambda: load.count("ok", since=reloaded) >= 50,
                   message="50 requests after the reload")
    assert not failures(load.results()), summary(failures(load.results()))
    events = [line.split() for line in log.read_text().splitlines()]
    new = set(server.started_workers()) - old
    assert len(new) == 2
    when = {(int(pid), event): float(at) for pid, event, at in events}
    # Each old worker shut its app down only after a new one had started its.
    first_new_start = min(when[pid, "startup"] for pid in new)
    for pid in old:
        assert when[pid, "shutdown"] > first_new_start


def lifespan_events(log: Path, event: str) -> set[int]:
    return {int(line.split()[0]) for line in log.read_text().splitlines()
            if line.split()[1] == event}


def test_lifespan_shutdown_runs_when_a_worker_is_recycled(start_server, tmp_path):
    log = tmp_path / "events"
    server = serve(start_server, "fastapi_app:app", "--max-requests", "10",
                   env={"LIFESPAN_EVENTS": str(log)})
    first = set(server.started_workers())
    for _ in range(25):
        assert request(server, "/items/1").status == 200
    recycled = int(server.wait_for_log(
        r"Replacing worker (\d+): it reached --max-requests")[0].group(1))
    assert recycled in first
    successor = int(server.wait_for_log(rf"Worker (\d+) replaces worker {recycled}")[0].group(1))
    server.wait_for_log(rf"Worker {recycled} exited \(exit code 0\)")
    assert recycled in lifespan_events(log, "shutdown")
    # The successor had started its app when it was reported ready.
    assert successor in lifespan_events(log, "startup")


def test_lifespan_shutdown_runs_when_a_worker_is_removed(start_server, tmp_path):
    log = tmp_path / "events"
    server = serve(start_server, "fastapi_app:app", env={"LIFESPAN_EVENTS": str(log)})
    first = set(server.started_workers())
    server.proc.send_signal(signal.SIGTTOU)
    server.wait_for_log(r"Removing a worker: 1 now")
    wait_until(lambda: len(server.worker_pids()) == 1, message="one worker left")
    removed = first - server.worker_pids()
    assert len(removed) == 1
    server.wait_for_log(rf"Worker {removed.pop()} exited \(exit code 0\)")
    assert lifespan_events(log, "shutdown") == first - server.worker_pids()


def start_held_in_startup(start_server, tmp_path, *args: str):
    """A server whose two workers are both inside the app's lifespan startup; the gate."""
    events, gate = tmp_path / "events", tmp_path / "gate"
    server = serve(start_server, "slow_startup:app", *args, ready=False,
                   env={"STARTUP_GATE": str(gate), "STARTUP_EVENTS": str(events)})
    wait_until(lambda: events.exists() and events.read_text().count("waiting") == 2,
               message="both workers inside their app's startup")
    return server, gate


def test_a_stop_while_apps_start_lets_them_finish_starting(start_server, tmp_path):
    server, gate = start_held_in_startup(start_server, tmp_path)
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for_log(r"Stopping")
    gate.touch()    # startup ends after the stop began; then the workers leave
    assert server.proc.wait(30) == 0
    # Read to the end of its log first: the primary has exited, its last
    # lines may still be in the pipe.
    server.wait_for_log(r"Worker \d+ exited \(exit code 0\)", count=2)
    assert not server.find(r"Traceback|cannot start|exit code [1-9]|died"), server.log
    assert len(server.find(r"Worker \d+ exited \(exit code 0\)")) == 2



def test_a_worker_quit_while_its_app_starts_says_so_and_is_killed_if_it_lingers(
        start_server, tmp_path):
    # SIGQUIT inside the app's startup; a thread keeps the process alive.
    # The primary hears it leave: a successor at once, and the kill after
    # the grace period, with the watchdog off.
    events, gate = tmp_path / "events", tmp_path / "gate"
    server = serve(start_server, "slow_startup:app", "--timeout", "0",
                   "--graceful-timeout", "1", workers=1, ready=False,
                   env={"STARTUP_GATE": str(gate), "STARTUP_EVENTS": str(events),
                        "HANG_AT_EXIT": "1"})
    wait_until(lambda: events.exists() and "waiting" in events.read_text(),
               message="the worker inside its app's startup")
    [quitter] = [int(line.split()[1]) for line in events.read_text().splitlines()]
    os.kill(quitter, signal.SIGQUIT)
    server.wait_for_log(rf"Worker {quitter} is finishing its connections; "
                        r"starting its successor")
    server.wait_for_log(rf"Worker {quitter} did not exit within --graceful-timeout 1 s; "
                        r"killing it")
    gate.touch()
    server.wait_ready()
    assert get(server.host, server.port).status == 200



def test_an_app_shutdown_that_never_ends_is_abandoned_quietly(start_server):
    # Cut off at what is left of --graceful-timeout: a warning, then exit 0;
    # the cancellation is ours, not an error of the app's.
    server = serve(start_server, "hangs_at_shutdown:app", "--graceful-timeout", "1",
                   workers=1)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    server.kill()       # reads the log to its end
    assert server.find(r"The application's shutdown did not finish within")
    assert not server.find(r"Traceback|CancelledError|Exception in the application|"
                           r"cannot start|exit code [1-9]"), server.log


def test_a_stop_while_apps_start_ends_at_the_graceful_timeout(start_server, tmp_path):
    server, _ = start_held_in_startup(start_server, tmp_path, "--graceful-timeout", "2")
    assert server.stop() == 0
    assert len(server.find(r"stopped before its app had started")) == 2
    assert not server.find(r"Traceback|cannot start|exit code [1-9]|died"), server.log


def test_a_stop_sent_to_the_whole_process_group_exits_cleanly(start_server, tmp_path):
    # systemd's default KillMode=control-group, or `kill -TERM -PGID`: the
    # workers get SIGTERM with the primary.  Successors started for workers
    # that began draining must not die starting, nor outlive the stop.
    events = tmp_path / "events"
    server = serve(start_server, "fastapi_app:app", env={"LIFESPAN_EVENTS": str(events)})
    os.killpg(server.pid, signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert not server.find(r"Traceback|cannot start|exit code [1-9]"), server.log


def test_lifespan_startup_failure_is_a_boot_failure(start_server):
    server = serve(start_server, "failing_startup:app", workers=1, ready=False)
    assert server.proc.wait(timeout=60) == 3
    assert server.find("startup failed: no database")


def test_an_app_that_returns_from_lifespan_serves_without_it(start_server):
    server = serve(start_server, "edge_asgi:http_only", workers=1)
    assert request(server, "/").body == b"http only"


def test_lifespan_on_requires_an_answer(start_server):
    server = serve(start_server, "edge_asgi:http_only", "--lifespan", "on", workers=1,
                   ready=False)
    assert server.proc.wait(timeout=60) == 3
    assert server.find("returned from lifespan without answering")


def test_lifespan_off_serves_without_it(start_server):
    server = serve(start_server, "failing_startup:app", "--lifespan", "off", workers=1)
    assert request(server, "/").body == b"unreachable"


# A busy worker is seen

def test_a_worker_blocked_by_cpu_work_gets_no_new_connections(edge):
    with connect(edge) as blocker:
        blocker.request("/burn?s=3")
        burning = wait_until(lambda: [int(e.split()[1]) for e in events(edge)
                                      if e.startswith("burning")],
                             message="the burn to start")[-1]
        # Its event loop is blocked for 3 s: the other worker answers them all.
        served_by = [int(request(edge, "/pid").body) for _ in range(10)]
        assert blocker.response().body == b"/burn"
    assert burning not in served_by
    assert len(served_by) == 10


# Found in review: each of these was a real failure once

def test_each_pipelined_request_keeps_its_own_http_version(edge):
    data = raw(edge, b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /chunked HTTP/1.0\r\n\r\n")
    first, _, second = data.partition(b"HTTP/1.1 200 OK")[2].partition(b"HTTP/1.1 200 OK")
    assert b"Transfer-Encoding" not in second and second.endswith(b"one two three")


def test_http10_keep_alive_then_http11(edge):
    with connect(edge) as conn:
        conn.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                  b"GET /chunked HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.response().body == b"/a"
        assert conn.response().body == b"one two three"
        assert conn.response().body == b"/after"


def test_a_stalled_body_the_app_ignored_times_out(start_server):
    server = serve(start_server, "edge_asgi:app", "--keepalive-timeout", "1", workers=1)
    with connect(server) as conn:
        conn.send(b"POST /ignore-body HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n"
                  + b"z" * 10)
        assert conn.response().body == b"ignored"
        started = time.monotonic()
        assert conn.closed_by_server()
    assert time.monotonic() - started < 10


def test_the_app_sees_a_disconnect_with_a_request_queued_behind(edge):
    with socket.create_connection((edge.host, edge.port), timeout=30) as sock:
        sock.sendall(b"GET /wait-disconnect HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: events(edge).count("waiting") >= 1, message="the app to wait")
        before = events(edge).count("http.disconnect")
    wait_until(lambda: events(edge).count("http.disconnect") > before,
               message="http.disconnect with a request queued")


def test_bad_input_after_good_requests_answers_them_first(edge):
    data = raw(edge, b"GET /sleep?s=0.2 HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /x HTTP/1.1\r\nHost: t\r\n\r\nBLAH\x01 / HTTP/1.1\r\n\r\n")
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", data) == [b"200", b"200", b"400"], data
    assert data.index(b"/sleep") < data.index(b"\r\n\r\n/x")


def test_chunked_trailers_are_not_request_headers(edge):
    with connect(edge) as conn:
        conn.send(b"POST /headers HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nX-Evil: 1\r\n\r\n")
        body = conn.response().body
    assert b"x-forwarded-for" not in body and b"x-evil" not in body
    assert b"transfer-encoding" in body


@pytest.mark.parametrize("path", ["/too-long", "/status-103", "/bad-length", "/two-lengths"])
def test_app_framing_mistakes_are_500(edge, path):
    data = raw(edge, f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 500 "), data



def test_an_answer_before_100_continue_closes_the_connection(edge):
    # No 100 Continue went out and the body is not in: the client may send
    # it or not, so the bytes after the head cannot be told from a next
    # request.  The connection closes after the answer, which says so.
    data = raw(edge, b"POST /ignore-body HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and b"connection: close" in data.lower()
    assert data.count(b"HTTP/1.1 ") == 1

def test_an_expectation_without_a_body_keeps_the_connection(edge):
    # Nothing is in doubt: a GET that says Expect: 100-continue.
    data = raw(edge, b"GET /host HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n"
                     b"GET /host HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 200 ") == 2, data


def test_an_app_s_harmless_length_mistakes_are_mended(edge):
    # The same length twice goes out once; a 204 carries none (RFC 9110,
    # 8.6).  The connection stays usable: the next response follows.
    data = raw(edge, b"GET /same-length-twice HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /no-content-with-length HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /host HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    first, second, third = data.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and first.lower().count(b"content-length: 5") == 1
    assert first.endswith(b"\r\n\r\nhello")
    assert second.startswith(b"204 ") and b"content-length" not in second.lower()
    assert third.startswith(b"200 ") and third.endswith(b'["t"]')


def test_client_that_never_reads_is_dropped_after_the_send_timeout(start_server, tmp_path):
    events_file = tmp_path / "events"
    server = serve(start_server, "edge_asgi:app", "--send-timeout", "1", workers=1,
                   env={"APP_EVENTS": str(events_file)})
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /stream-forever HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: events_file.exists() and "stopped after" in events_file.read_text(),
                   message="the app's send to fail")


def test_server_address_on_a_wildcard_bind_is_the_connections_own(start_server):
    server = serve(start_server, "fastapi_app:app", "--host", "0.0.0.0", workers=1)
    with Connection("127.0.0.1", server.port) as conn:
        conn.request("/scope", headers={"Connection": "close"})
        scope = json.loads(conn.response().body)
    assert scope["server"] == ["127.0.0.1", server.port]


def test_a_worker_whose_app_only_waits_is_not_busy(start_server, tmp_path):
    # Round-robin skips only busy workers: one whose request awaits (a slow
    # database, say) keeps getting its turn, as its loop is free.
    events_file = tmp_path / "events"
    server = serve(start_server, "edge_asgi:app", "--policy", "round-robin",
                   env={"APP_EVENTS": str(events_file)})
    with connect(server) as sleeper:
        sleeper.request("/sleep?s=3")
        wait_until(lambda: events_file.exists() and "sleeping" in events_file.read_text(),
                   message="the app to start waiting")

        def both_take_turns() -> bool:
            # A worker kept off its CPU for a few milliseconds on a loaded
            # machine reads as frozen and misses turns, by design: ten
            # requests in a row that reach both show the policy.
            served_by = {int(request(server, "/pid").body) for _ in range(10)}
            assert not select.select([sleeper], [], [], 0)[0], "the app stopped waiting"
            return served_by == server.worker_pids()
        wait_until(both_take_turns, timeout=2.5, interval=0,
                   message="ten requests in a row to reach both workers")
        assert sleeper.response().body == b"/sleep"


def test_a_worker_whose_requests_await_takes_many_new_connections(start_server):
    # A handler that awaits (a database, an API) leaves the worker free: its
    # connections must not count as a queue the primary waits on, or one
    # worker would hold --queue-depth requests at a time (a second each,
    # until its tick).  20 new connections must all reach the app at once.
    import concurrent.futures
    server = serve(start_server, "edge_asgi:app", workers=1)
    count = 20

    def gather(_):
        return request(server, f"/gather?n={count}&timeout=5")

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        responses = list(pool.map(gather, range(count)))
    assert [r.status for r in responses] == [200] * count
    assert {int(r.body) for r in responses} == {count}


def test_sigterm_under_load_answers_every_request_sent_before_it(start_server):
    from load_client import LoadClient, summary
    server = serve(start_server, "fastapi_app:app")
    with LoadClient(server.host, server.port, path="/sleep?ms=50", threads=6) as load:
        wait_until(lambda: load.count("ok") >= 20, message="20 requests served")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
    outcomes = load.results()
    sent_before = [o for o in outcomes if o.sent is not None and o.sent < signalled]
    assert sent_before and all(o.kind == "ok" for o in sent_before), summary(sent_before)
    assert not [o for o in outcomes if o.kind in ("truncated", "error")], summary(outcomes)
