"""An ASGI app whose lifespan startup waits until the file STARTUP_GATE names exists.

With STARTUP_EVENTS set, each worker appends "waiting PID" to that file as it
begins to wait.
"""

import asyncio
import os
import time


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        if os.environ.get("STARTUP_EVENTS"):
            with open(os.environ["STARTUP_EVENTS"], "a") as events:
                events.write(f"waiting {os.getpid()}\n")
        deadline = time.monotonic() + 60
        while not os.path.exists(os.environ["STARTUP_GATE"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/sleep":
        await asyncio.sleep(2)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"%d" % os.getpid()})
