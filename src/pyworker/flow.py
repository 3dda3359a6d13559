"""The write side of a connection: the transport's high-water mark, and who waits on it.

asyncio calls pause_writing/resume_writing on the protocol; senders (an
ASGI app's `send`, a WSGI thread's chunk) wait in drain() until the buffer
is below its low-water mark, or the connection is gone.  `paused_since`
lets the worker close a connection whose client stopped reading for good.
"""

from __future__ import annotations

import asyncio


class WriteFlow:
    __slots__ = ("loop", "paused", "paused_since", "lost", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.paused = False
        self.paused_since = 0.0
        self.lost = False
        self.waiters: list[asyncio.Future] = []

    def pause(self, now: float) -> None:
        self.paused = True
        self.paused_since = now

    def resume(self) -> None:
        self.paused = False
        self.wake()

    def lose(self) -> None:
        """The connection is gone: nobody waits for room any more."""
        self.lost = True
        self.wake()

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self.paused and not self.lost:
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            await waiter

    def stalled(self, cutoff: float) -> bool:
        """Paused since before `cutoff`: the client has not read for that long."""
        return self.paused and self.paused_since < cutoff
