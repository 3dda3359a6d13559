"""An ASGI app that keeps its process from exiting: a non-daemon thread that
never ends (a forgotten background job), so the interpreter waits for it
forever once the worker's loop is done."""

import threading

threading.Thread(target=threading.Event().wait, name="never-ends").start()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"still here"})
