"""Instructions per ASGI request in a worker's protocol, counted by callgrind.

    python bench/request_instructions.py [--app raw|starlette] [--close]

Requests go through pyworker.asgi.AsgiProtocol on a real uvloop loop, with a
stand-in transport (no socket: the parse, the scope, the task, the app, the
response), each followed by one turn of the loop. The script runs itself
twice under `valgrind --tool=callgrind`, with 1,000 and 3,000 requests, and
prints the difference divided by 2,000: what one more request costs, start-up
excluded. Instruction counts do not depend on what else the machine is doing,
so a change of 1% shows, where timing on a shared 2-CPU machine moves by 5%.
The hash seed is fixed, so a re-run gives the same count.

--close: a new protocol per request (`Connection: close`), closed after it:
what a new connection costs the protocol (the worker's adoption of the
socket is not in it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: wrk\r\n\r\n"
CLOSE = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def serve(count: int, app_name: str, close: bool) -> None:
    """Serve `count` requests in this process."""
    import socket

    import uvloop

    from cydispatch._dispatch import WorkerChannel
    from cydispatch.settings import Settings
    from pyworker.asgi import AsgiConfig, AsgiProtocol
    from pyworker.http import Responses
    from pyworker.proxy import ProxyTrust

    if app_name == "starlette":
        from cydispatch.bench.starlette_app import app
    else:
        from cydispatch.bench.apps import hello as app

    class Worker:
        draining = False
        now = 0.0
        requests = 0
        responses = Responses()

        def __init__(self, loop) -> None:
            ours, self.primary_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.channel = WorkerChannel(ours.detach())
            self.loop = loop
            self.begin, self.end = self.channel.begin, self.channel.end
            self.stamped, self.observe = self.channel.stamped, self.channel.observe

        def connection_opened(self, protocol) -> None:
            pass

        def connection_closed(self, protocol) -> None:
            pass

        def dequeued(self, protocol) -> None:
            pass

    class Transport:
        def __init__(self) -> None:
            self.closing = False
            self.answered = 0

        def write(self, data: bytes) -> None:
            self.answered += data.startswith(b"HTTP/1.1 200 ")

        def close(self) -> None:
            self.closing = True

        def is_closing(self) -> bool:
            return self.closing

        def get_extra_info(self, name):
            return ("127.0.0.1", 40000)

        def set_write_buffer_limits(self, high, low) -> None:
            pass

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    settings = Settings()
    config = AsgiConfig(app, settings, ProxyTrust(settings), None, local=("127.0.0.1", 8000))
    worker = Worker(loop)

    async def run() -> int:
        transport = Transport()
        protocol = AsgiProtocol(worker, config)
        protocol.connection_made(transport)
        for _ in range(count):
            if close:
                transport.closing = False
                protocol = AsgiProtocol(worker, config)
                protocol.connection_made(transport)
                protocol.data_received(CLOSE)
                await asyncio.sleep(0)
                protocol.connection_lost(None)
            else:
                protocol.data_received(REQUEST)
                await asyncio.sleep(0)
        return transport.answered

    answered = loop.run_until_complete(run())
    if answered != count:
        sys.exit(f"{answered} of {count} requests answered 200")


def instructions(count: int, args) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
               sys.executable, __file__, "--serve", str(count), "--app", args.app]
    if args.close:
        command.append("--close")
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode or not found:
        sys.exit(f"callgrind failed:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--app", choices=("raw", "starlette"), default="raw")
    parser.add_argument("--close", action="store_true")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.app, args.close)
        return
    per_request = (instructions(3000, args) - instructions(1000, args)) / 2000
    what = "new connection" if args.close else "request"
    print(f"{per_request:,.0f} instructions per {what} ({args.app} app)")


if __name__ == "__main__":
    main()
