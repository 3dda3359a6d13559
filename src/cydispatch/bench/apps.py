"""Apps for `cydispatch bench --app`: the built-in app's routes, as ASGI and as WSGI.

Each answers `GET /` with `Hello from Worker <pid>` (so the balance workload
can count workers) and `GET /slow?ms=N` by burning N ms of CPU (the skew
workload), like the built-in app, so every workload runs against them and
against the same app under other servers.  A Starlette version is in
starlette_app.py (it needs starlette installed).
"""

from __future__ import annotations

import os
import time

SLOW_MAX_MS = 1000


def burn(query: bytes) -> int:
    """Burn the CPU time `ms=N` in the query asks for; the milliseconds burned."""
    ms = 0
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name == b"ms" and value.isdigit():
            ms = min(int(value), SLOW_MAX_MS)
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass
    return ms


HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


async def hello(scope, receive, send):
    """A raw ASGI 3 app: what the server costs, with no framework in the way."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        burn(scope["query_string"])
    elif scope["path"] != "/":
        await send({"type": "http.response.start", "status": 404, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"Not Found\n"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b"Hello from Worker %d" % os.getpid()})


def hello_wsgi(environ, start_response):
    """The same app as WSGI."""
    path = environ["PATH_INFO"]
    if path == "/slow":
        burn(environ["QUERY_STRING"].encode("latin-1"))
    elif path != "/":
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"Not Found\n"]
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    return [b"Hello from Worker %d" % os.getpid()]
