"""ASGI lifespan: the app's startup before the worker reports ready, its shutdown after it drains.

The app runs once per worker as a task that receives lifespan.startup, then,
much later, lifespan.shutdown.  Its `state` dict is shallow-copied into every
request's scope.

--lifespan on: an app that fails startup, or raises, stops the worker (a boot
failure).  auto: an app that raises before answering startup is taken not to
support lifespan (as uvicorn does), and serves without it.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("cydispatch.worker")

ASGI_VERSION = {"version": "3.0", "spec_version": "2.0"}


class LifespanFailed(Exception):
    """Startup (or, with --lifespan on, the lifespan protocol) failed."""


class Lifespan:
    def __init__(self, app, mode: str) -> None:
        self.app = app
        self.mode = mode
        self.state: dict = {}
        self.supported = mode != "off"
        self.task: asyncio.Task | None = None
        self.inbox: asyncio.Queue | None = None
        self.answers: asyncio.Queue | None = None
        self.started = False    # the app answered startup
        self.abandoned = False  # its shutdown outlasted the time it had

    async def startup(self) -> None:
        """Run the app's startup; raise LifespanFailed if it fails."""
        if not self.supported:
            return
        self.inbox = asyncio.Queue()
        self.answers = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}
        self.task = asyncio.get_running_loop().create_task(self.main(scope))
        await self.inbox.put({"type": "lifespan.startup"})
        answer = await self.answers.get()
        if answer["type"] == "lifespan.startup.complete":
            return
        if answer["type"] == "app.unsupported":
            return
        if answer["type"] == "lifespan.startup.failed":
            message = answer.get("message") or "no message"
            raise LifespanFailed(f"the application's startup failed: {message}")
        raise LifespanFailed(f"the application's startup failed: {answer['error']}")

    async def main(self, scope: dict) -> None:
        try:
            await self.app(scope, self.receive, self.send)
        except BaseException as exc:
            if self.abandoned:
                return      # cancelled by shutdown(), which said why
            if self.mode == "auto" and self.answers.empty() and not self.started:
                log.info("The application does not support ASGI lifespan "
                         "(%s: %s); serving without it", type(exc).__name__, exc)
                self.supported = False
                await self.answers.put({"type": "app.unsupported"})
                return
            log.error("Exception in the application's lifespan", exc_info=exc)
            await self.answers.put({"type": "app.error", "error": f"{type(exc).__name__}: {exc}"})
        else:
            if self.mode == "auto" and not self.started:
                # `if scope["type"] != "http": return` is a common way to say so.
                log.debug("The application returned from lifespan before startup; "
                          "serving without lifespan")
                self.supported = False
                await self.answers.put({"type": "app.unsupported"})
                return
            # Whatever was not answered now never will be.
            await self.answers.put({"type": "app.error",
                                    "error": "the application returned from lifespan "
                                             "without answering"})

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
            self.started = True
        elif kind not in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            raise RuntimeError(f"unexpected lifespan message {kind!r}")
        await self.answers.put(message)

    async def shutdown(self, timeout: float) -> None:
        """Run the app's shutdown, for at most `timeout` seconds; never raises."""
        if not self.supported or self.task is None:
            return
        if self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        try:
            answer = await asyncio.wait_for(self.answers.get(), timeout)
        except asyncio.TimeoutError:
            log.warning("The application's shutdown did not finish within %g s", timeout)
            self.abandoned = True
            self.task.cancel()
            return
        if answer["type"] == "lifespan.shutdown.failed":
            log.error("The application's shutdown failed: %s", answer.get("message", ""))
        elif answer["type"] == "app.error":
            log.error("The application's shutdown failed: %s", answer["error"])
