"""A raw ASGI app whose routes each do one thing a server must cope with."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import os
import time


def record(event: str) -> None:
    path = os.environ.get("APP_EVENTS")
    if path:
        with open(path, "a") as events:
            events.write(event + "\n")


async def read_body(receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away")
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)


# Set by /context: a request must never see what an earlier one set.
REQUEST_MARK: contextvars.ContextVar[str] = contextvars.ContextVar("request_mark", default="-")


async def start(send, status=200, headers=()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), *headers]})


async def websocket(scope, receive, send):
    """/ws echoes; /ws-close closes with 4001; /ws-deny refuses; /ws-raise fails."""
    path = scope["path"]
    assert (await receive())["type"] == "websocket.connect"
    if path == "/ws-deny":
        await send({"type": "websocket.close"})
        return
    if path == "/ws-raise":
        raise RuntimeError("cannot take this socket")
    protocols = scope["subprotocols"]
    await send({"type": "websocket.accept", "subprotocol": protocols[0] if protocols else None})
    if path == "/ws-spam":
        sent = 0
        try:
            while True:
                await send({"type": "websocket.send", "text": "spam"})
                sent += 1
                await asyncio.sleep(0)
        except OSError as exc:
            record(f"spam stopped by {type(exc).__name__}")
            raise
    if path == "/ws-close":
        await send({"type": "websocket.close", "code": 4001, "reason": "done here"})
        return
    if path == "/ws-scope":
        await send({"type": "websocket.send", "text": repr(
            {k: scope[k] for k in ("scheme", "path", "query_string", "subprotocols")})})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            record(f"ws disconnect {message['code']}")
            return
        if message.get("text") == "raise":
            raise RuntimeError("failed mid-conversation")
        await send({"type": "websocket.send", **{k: v for k, v in message.items()
                                                   if k in ("text", "bytes") and v is not None}})


# /gather: requests in the app at once, on this worker, and the most seen.
gathering = {"now": 0, "peak": 0}
gathered = asyncio.Event()


async def gather(count: int, timeout: float) -> int:
    """Wait (as a handler awaiting a database would) until `count` requests wait here."""
    gathering["now"] += 1
    gathering["peak"] = max(gathering["peak"], gathering["now"])
    if gathering["now"] >= count:
        gathered.set()
    try:
        await asyncio.wait_for(gathered.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    gathering["now"] -= 1
    return gathering["peak"]


async def app(scope, receive, send):
    if scope["type"] == "websocket":
        return await websocket(scope, receive, send)
    if scope["type"] != "http":
        raise RuntimeError("no lifespan here")   # --lifespan auto: not supported
    path = scope["path"]
    query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
    if path == "/raise-before":
        raise RuntimeError("before the response")
    if path == "/raise-after":
        await start(send)
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("in the middle of the response")
    if path == "/exit":
        raise SystemExit(1)
    if path == "/no-response":
        return
    if path == "/gather":
        peak = await gather(int(query["n"]), float(query["timeout"]))
        await start(send)
        await send({"type": "http.response.body", "body": b"%d" % peak})
        return
    if path == "/chunked":
        await start(send)
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/bad-header":
        await start(send, headers=[(b"x-injected", b"a\r\nSet-Cookie: evil=1")])
        await send({"type": "http.response.body", "body": b"never"})
        return
    if path == "/sha256":
        body = await read_body(receive)
        await start(send)
        await send({"type": "http.response.body",
                    "body": b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())})
        return
    if path == "/hold":
        # Take the first part of the body, then nothing until the file named
        # by ?release= exists: the client's upload must stall meanwhile.
        digest, size = hashlib.sha256(), 0
        message = await receive()
        record(f"holding {os.getpid()}")
        deadline = time.monotonic() + 60
        while not os.path.exists(query["release"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        while True:
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
            message = await receive()
        await start(send)
        await send({"type": "http.response.body",
                    "body": b"%d %s" % (size, digest.hexdigest().encode())})
        return
    if path == "/ignore-body":
        await start(send)
        await send({"type": "http.response.body", "body": b"ignored"})
        return
    if path == "/wait-disconnect":
        await read_body(receive)
        record("waiting")
        message = await receive()
        record(message["type"])
        return
    if path == "/stream-forever":
        await start(send)
        sent = 0
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x" * 65536,
                            "more_body": True})
                sent += 1
        except OSError:
            record(f"stopped after {sent} chunks")
            raise
    if path == "/large-stream":
        chunks = int(query.get("chunks", "16"))
        await start(send, headers=[(b"content-length", b"%d" % (chunks * 65536))])
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": b"y" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/burn":
        # CPU work inside the request: the event loop is blocked meanwhile.
        record(f"burning {os.getpid()}")
        end = time.thread_time() + float(query.get("s", "1"))
        while time.thread_time() < end:
            pass
    if path == "/headers":
        await read_body(receive)
        await start(send)
        await send({"type": "http.response.body",
                    "body": repr([name for name, _ in scope["headers"]]).encode()})
        return
    if path == "/host":
        await start(send)
        await send({"type": "http.response.body", "body": json.dumps(
            [value.decode() for name, value in scope["headers"] if name == b"host"]).encode()})
        return
    if path == "/too-long":
        await start(send, headers=[(b"content-length", b"3")])
        await send({"type": "http.response.body", "body": b"four"})
        return
    if path == "/status-103":
        await start(send, status=103)
        await send({"type": "http.response.body", "body": b"early"})
        return
    if path == "/bad-length":
        await start(send, headers=[(b"content-length", b"+5")])
        await send({"type": "http.response.body", "body": b"hello"})
        return
    if path == "/two-lengths":
        await start(send, headers=[(b"content-length", b"10"), (b"content-length", b"5")])
        await send({"type": "http.response.body", "body": b"hello"})
        return
    if path == "/same-length-twice":
        await start(send, headers=[(b"content-length", b"5"), (b"Content-Length", b"5")])
        await send({"type": "http.response.body", "body": b"hello"})
        return
    if path == "/no-content-with-length":
        await start(send, status=204, headers=[(b"content-length", b"0")])
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/sleep":
        record(f"sleeping {os.getpid()}")
        await asyncio.sleep(float(query.get("s", "0.1")))
    if path == "/client":
        client = scope["client"]
        await start(send)
        await send({"type": "http.response.body", "body": b"%s %d" % (
            client[0].encode(), client[1])})
        return
    if path == "/pid":
        await start(send)
        await send({"type": "http.response.body", "body": b"%d" % os.getpid()})
        return
    if path == "/context":
        # What asyncio gives a request: a task of its own (anyio, sniffio and
        # every framework built on them ask for it), and its own context.
        task = asyncio.current_task()
        seen = REQUEST_MARK.get()
        REQUEST_MARK.set(query.get("mark", "?"))
        body = await read_body(receive)
        await start(send)
        await send({"type": "http.response.body", "body": b"task=%s seen=%s body=%s" % (
            b"yes" if task is not None else b"no", seen.encode(), body)})
        return
    if path == "/version":
        await start(send)
        await send({"type": "http.response.body", "body": scope["http_version"].encode()})
        return
    if path == "/scheme":
        await start(send)
        await send({"type": "http.response.body", "body": scope["scheme"].encode()})
        return
    await start(send)
    await send({"type": "http.response.body", "body": path.encode()})


async def http_only(scope, receive, send):
    """An app that returns at once for anything but HTTP, as many raw apps do."""
    if scope["type"] != "http":
        return
    await start(send)
    await send({"type": "http.response.body", "body": b"http only"})
