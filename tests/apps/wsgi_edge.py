"""A raw WSGI app whose routes each do one thing a server must cope with."""

import os
import time


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/write-then-list":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"hello ")
        return [b"world"]
    if path == "/sleep":
        # Blocks its pool thread, not the event loop.
        record(f"sleeping {os.getpid()}")
        time.sleep(3)
    if path == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % os.getpid()]
    if path == "/endless":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return endless()
    if path == "/readline":
        stream = environ["wsgi.input"]
        lines = [stream.readline(), stream.readline(4), stream.readline()]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [repr(lines).encode()]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"Hello from Worker %d" % os.getpid()]


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
