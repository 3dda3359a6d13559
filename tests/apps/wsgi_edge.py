"""A raw WSGI app whose routes each do one thing a server must cope with."""

import hashlib
import os
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/write-then-list":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"hello ")
        return [b"world"]
    if path == "/sleep":
        # Blocks its pool thread, not the event loop.
        record(f"sleeping {os.getpid()}")
        time.sleep(float(parse_qs(environ["QUERY_STRING"]).get("s", ["3"])[0]))
    if path.startswith("/path-info/"):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [path.encode("latin-1")]      # PEP 3333: the bytes, as latin-1
    if path == "/client":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{environ['REMOTE_ADDR']} {environ['REMOTE_PORT']}".encode()]
    if path == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % os.getpid()]
    if path == "/scheme":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["wsgi.url_scheme"].encode()]
    if path == "/endless":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return endless()
    if path == "/readline":
        stream = environ["wsgi.input"]
        lines = [stream.readline(), stream.readline(4), stream.readline()]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [repr(lines).encode()]
    if path == "/large":
        chunks = int(parse_qs(environ["QUERY_STRING"])["chunks"][0])
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(chunks * 65536))])
        return (b"y" * 65536 for _ in range(chunks))
    if path == "/hold":
        return hold(environ, start_response)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"Hello from Worker %d" % os.getpid()]


def hold(environ, start_response):
    """Read 64 KB of the body, then nothing until the file ?release= names exists."""
    release = parse_qs(environ["QUERY_STRING"])["release"][0]
    stream = environ["wsgi.input"]
    digest, size = hashlib.sha256(), 0
    chunk = stream.read(65536)
    record(f"holding {os.getpid()}")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    while chunk:
        digest.update(chunk)
        size += len(chunk)
        chunk = stream.read(65536)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d %s" % (size, digest.hexdigest().encode())]


def record(event: str) -> None:
    path = os.environ.get("APP_EVENTS")
    if path:
        with open(path, "a") as events:
            events.write(event + "\n")


def endless():
    try:
        while True:
            yield b"z" * 65536
    finally:
        record("endless closed")
