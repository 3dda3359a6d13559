"""An ASGI app whose lifespan startup waits until the file STARTUP_GATE names exists.

With STARTUP_EVENTS set, each worker appends "waiting PID" to that file as it
begins to wait.  With HANG_AT_EXIT set, a thread that never ends keeps each
worker's process from exiting.
"""

import asyncio
import os
import threading
import time

if os.environ.get("HANG_AT_EXIT"):
    threading.Thread(target=threading.Event().wait, name="never-ends").start()


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
