"""The quick start's app: plain ASGI 3, no framework, so `pip install .` is all it needs.

    cydispatch serve examples.hello:app

`/` says which worker answered; `/items/{n}` answers JSON; lifespan startup
runs in each worker before it serves, and its state reaches every request.
FastAPI, Starlette, Litestar, Django and Flask apps are served the same way.
"""

from __future__ import annotations

import json
import os
import time


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(scope, receive, send)
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/":
        await respond(send, 200, "text/plain", f"Hello from Worker {os.getpid()}\n")
    elif path.startswith("/items/") and path[len("/items/"):].isdigit():
        item = {"id": int(path[len("/items/"):]), "worker": os.getpid(),
                "worker_up_seconds": round(time.monotonic() - scope["state"]["started"], 3)}
        await respond(send, 200, "application/json", json.dumps(item))
    else:
        await respond(send, 404, "text/plain", "Not found\n")


async def lifespan(scope, receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            # Open database pools, load models...: here, note the time.  What
            # startup puts in the state, every request's scope["state"] has.
            scope["state"]["started"] = time.monotonic()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def respond(send, status: int, content_type: str, text: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode())]})
    await send({"type": "http.response.body", "body": text.encode()})
