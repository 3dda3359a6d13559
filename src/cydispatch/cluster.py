"""Messages between workers, as Node's cluster has them: what an app imports.

    from cydispatch import cluster

    cluster.worker_id          # 0..N-1 in a worker: its slot, kept across restarts;
                               # None outside cydispatch
    cluster.broadcast(obj)     # every worker's handlers get obj, the sender's too

    @cluster.on_message
    def handle(obj, sender_id): ...    # on the worker's event loop

In a worker, a broadcast goes to the primary over a socket of its own (not
the channel connections arrive on, which the worker stops reading while its
hand is full), and the primary sends it on to every live worker: see
pyworker/messages.py and cydispatch/messages.py.  Going through the primary
gives every worker, the sender included, the messages in the same order.

Outside cydispatch (a test, a script, another server) the same calls work as
one process: handlers run on the running event loop, or at once when there
is none.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("cydispatch.cluster")

# A message is its JSON text, UTF-8: at most this many bytes.  Bounded so
# that one message fits the kernel's socket buffer whole and a burst of them
# cannot swell the primary (see cydispatch.messages for the outboxes).
MAX_MESSAGE_BYTES = 64 * 1024

worker_id: int | None = None

Handler = Callable[[Any, "int | None"], Any]
_handlers: list[Handler] = []
# Set by the worker (_connect): sends a message's bytes to the primary; safe
# to call from any thread.
_send: Callable[[bytes], None] | None = None


def on_message(handler: Handler) -> Handler:
    """Call `handler(obj, sender_id)` for every message broadcast, this worker's too.

    Usable as a decorator.  It runs on the worker's event loop; an exception
    it raises is logged.  A coroutine function's coroutine is scheduled as a
    task on that loop.
    """
    _handlers.append(handler)
    return handler


def broadcast(obj: Any) -> None:
    """Send `obj` (JSON-serialisable) to every worker's handlers, this one's included.

    Returns at once; handlers run later, on each worker's loop.  Safe to call
    from any thread (a WSGI app's).  Raises TypeError for what JSON cannot
    encode and ValueError for a message over MAX_MESSAGE_BYTES.
    """
    payload = encode(obj)
    if _send is not None:
        _send(payload)
        return
    # Outside cydispatch: this process is the whole cluster.
    message = json.loads(payload)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        deliver(message, None)
    else:
        loop.call_soon(deliver, message, None)


def encode(obj: Any) -> bytes:
    """`obj` as the bytes a message carries, or the error that says why it cannot be."""
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValueError(f"cluster message too large: {len(payload)} bytes of JSON, "
                         f"the limit is {MAX_MESSAGE_BYTES} bytes (64 KiB)")
    return payload


def deliver(obj: Any, sender_id: int | None) -> None:
    """Run every handler on a message; none of their errors goes further."""
    for handler in list(_handlers):
        try:
            result = handler(obj, sender_id)
            if inspect.isawaitable(result):
                _run_awaitable(result)
        except Exception:
            log.exception("cluster message handler %r failed", handler)


def _run_awaitable(awaitable) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(_await(awaitable))   # no loop here: run it to its end
        return
    task = loop.create_task(_await(awaitable))
    # Kept referenced until done: the loop holds tasks only weakly.
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


_tasks: set[asyncio.Task] = set()


async def _await(awaitable) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("cluster message handler failed")


def _connect(slot: int, send: Callable[[bytes], None]) -> None:
    """In a worker, before the app is imported: its id and its way to the primary."""
    global worker_id, _send
    worker_id = slot
    _send = send
