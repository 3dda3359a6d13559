"""A FastAPI app as users write them: JSON, path and query parameters, streaming, lifespan state.

Lifespan events are appended, one line each ("<pid> startup"), to the file
named by LIFESPAN_EVENTS when it is set, so tests can check their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, StreamingResponse


def record(event: str) -> None:
    path = os.environ.get("LIFESPAN_EVENTS")
    if path:
        with open(path, "a") as events:
            events.write(f"{os.getpid()} {event} {time.monotonic():.6f}\n")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    record("startup")
    yield {"started_by": os.getpid()}
    record("shutdown")


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def index():
    return {"hello": "world", "pid": os.getpid()}


@app.get("/items/{item_id}")
async def item(item_id: int, q: str | None = None):
    return {"item_id": item_id, "q": q}


@app.get("/sync")
def sync_route():
    # A plain def runs in Starlette's thread pool.
    return {"thread": True, "pid": os.getpid()}


@app.get("/state")
async def state(request: Request):
    return {"started_by": request.state.started_by, "pid": os.getpid()}


@app.get("/scope")
async def scope(request: Request):
    s = request.scope
    return {
        "http_version": s["http_version"], "method": s["method"], "scheme": s["scheme"],
        "path": s["path"], "raw_path": s["raw_path"].decode("latin-1"),
        "query_string": s["query_string"].decode("latin-1"), "root_path": s["root_path"],
        "client": list(s["client"]), "server": list(s["server"]),
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in s["headers"]],
        "url": str(request.url),
    }


@app.post("/upload")
async def upload(request: Request):
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


@app.post("/echo")
async def echo(request: Request):
    return StreamingResponse(request.stream(), media_type="application/octet-stream")


@app.get("/stream")
async def stream(chunks: int = 3, size: int = 10):
    async def generate():
        for i in range(chunks):
            yield str(i % 10).encode() * size
            await asyncio.sleep(0)
    return StreamingResponse(generate(), media_type="text/plain")


@app.get("/big")
async def big(mb: int = 1):
    return PlainTextResponse("x" * (mb * 1024 * 1024))


@app.get("/burn")
async def burn(ms: int = 100):
    # Sync work inside an async route: the event loop is blocked meanwhile.
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass
    return {"burned_ms": ms, "pid": os.getpid()}


@app.get("/sleep")
async def sleep(ms: int = 100):
    await asyncio.sleep(ms / 1000)
    return {"slept_ms": ms, "pid": os.getpid()}


@app.get("/error")
async def error():
    raise RuntimeError("the handler failed")


@app.websocket("/ws")
async def echo_socket(websocket: WebSocket):
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive_json()
            await websocket.send_json({"echo": message, "pid": os.getpid()})
    except WebSocketDisconnect:
        pass
