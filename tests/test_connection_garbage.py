"""A closed connection is freed by refcounting: it leaves nothing for the cyclic collector.

A protocol that keeps a reference cycle alive after its connection closes
(protocol and parser, protocol and request) is freed only by the cyclic
collector, whose runs every connection then pays for: before this was
checked, a worker serving the raw ASGI app ran about 900 collections (7 of
them full) per 65,000 new connections.  Served here in this process, on a
real uvloop loop, with a stand-in transport.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
import uvloop

from cydispatch.bench.apps import hello
from cydispatch.settings import Settings
from pyworker.app import HelloApp
from pyworker.asgi import AsgiConfig, AsgiProtocol
from pyworker.http import HttpProtocol
from pyworker.proxy import ProxyTrust
from test_microbench import AddressedTransport, LoopWorker

CONNECTIONS = 200
CLOSE = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
KEEP_ALIVE = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def asgi_protocol(worker):
    settings = Settings()
    config = AsgiConfig(hello, settings, ProxyTrust(settings), None,
                        local=("127.0.0.1", 8000))
    return lambda: AsgiProtocol(worker, config)


def builtin_protocol(worker):
    app = HelloApp()
    return lambda: HttpProtocol(worker, app)


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.parametrize("make", [asgi_protocol, builtin_protocol], ids=["asgi", "builtin"])
@pytest.mark.parametrize("request_bytes", [CLOSE, KEEP_ALIVE], ids=["close", "keepalive"])
def test_closed_connections_leave_no_garbage(loop, make, request_bytes):
    worker = LoopWorker(loop)
    new_protocol = make(worker)

    async def serve_connections() -> int:
        answered = 0
        for _ in range(CONNECTIONS):
            transport = AddressedTransport()
            protocol = new_protocol()
            protocol.connection_made(transport)
            protocol.data_received(request_bytes)
            for _ in range(3):      # the request's task, if it has one, runs
                await asyncio.sleep(0)
            answered += sum(b"200 OK" in response for response in transport.last)
            protocol.connection_lost(None)
        return answered

    loop.run_until_complete(serve_connections())   # the loop's own first garbage
    gc.collect()
    gc.disable()
    try:
        answered = loop.run_until_complete(serve_connections())
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert answered == CONNECTIONS
    assert unreachable == 0
