"""A WSGI app that waits 5 ms on every request, as for a database: its pool fills, and moves."""
import time


def app(environ, start_response):
    time.sleep(0.005)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]
