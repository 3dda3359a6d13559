"""A raw ASGI app that broadcasts cluster messages and shows what this worker received."""

from __future__ import annotations

import asyncio
import json
import os
from urllib.parse import parse_qs

from cydispatch import cluster

# What the app saw while it was being imported: the id must be there already.
IMPORTED_AS = cluster.worker_id
received: list[list] = []


@cluster.on_message
def refuse(obj, sender_id):
    if isinstance(obj, dict) and obj.get("raise"):
        raise RuntimeError("this handler refuses the message")


@cluster.on_message
def remember(obj, sender_id):
    received.append([obj, sender_id])


async def own_copies_arrived(count: int) -> None:
    """Until this worker has received `count` of its own messages back (10 s at most)."""
    for _ in range(1000):
        if sum(1 for _, sender in received if sender == cluster.worker_id) >= count:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"only some of {count} own messages came back")


async def answer(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    path = scope["path"]
    if path == "/received":
        await answer(send, 200, {"worker_id": cluster.worker_id, "imported_as": IMPORTED_AS,
                                 "pid": os.getpid(), "received": received})
    elif path == "/broadcast":
        message = {"tag": query.get("tag"), "blob": "x" * int(query.get("size", 0))}
        if query.get("raise"):
            message["raise"] = True
        try:
            cluster.broadcast(message)
        except ValueError as exc:
            await answer(send, 413, {"error": str(exc)})
            return
        await answer(send, 200, {"worker_id": cluster.worker_id})
    elif path == "/flood":
        # A well-behaved sender: a batch, then wait for its own copies to come
        # back, so that only the workers that do not read can fall behind.
        first, count, size, batch = (int(query[k]) for k in ("first", "count", "size",
                                                              "batch"))
        own_before = sum(1 for _, sender in received if sender == cluster.worker_id)
        for sent in range(count):
            cluster.broadcast({"flood": first + sent, "blob": "x" * size})
            if (sent + 1) % batch == 0 or sent + 1 == count:
                await own_copies_arrived(own_before + sent + 1)
        await answer(send, 200, {"sent": count})
    else:
        await answer(send, 200, {"worker_id": cluster.worker_id})
