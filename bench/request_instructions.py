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
socket is not in it). Run from a checkout with the test extra installed:
it uses the stand-ins of tests/test_microbench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: wrk\r\n\r\n"
CLOSE = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
# The stand-in worker and transport of the request microbenchmarks.
TESTS = Path(__file__).resolve().parent.parent / "tests"


def serve(count: int, app_name: str, close: bool) -> None:
    """Serve `count` requests in this process, through the request microbenchmarks' stand-ins."""
    import uvloop

    sys.path.insert(0, str(TESTS))
    from test_microbench import AddressedTransport, LoopWorker

    from cydispatch.settings import Settings
    from pyworker.asgi import AsgiConfig, AsgiProtocol
    from pyworker.proxy import ProxyTrust

    if app_name == "starlette":
        from cydispatch.bench.starlette_app import app
    else:
        from cydispatch.bench.apps import hello as app

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    settings = Settings()
    config = AsgiConfig(app, settings, ProxyTrust(settings), None, local=("127.0.0.1", 8000))
    worker = LoopWorker(loop)
    transport = AddressedTransport()

    async def run() -> int:
        answered = 0
        protocol = AsgiProtocol(worker, config)
        protocol.connection_made(transport)
        for _ in range(count):
            transport.last.clear()      # only this request's answer counts
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
            answered += bool(transport.last) and transport.last[-1].startswith(b"HTTP/1.1 200 ")
        return answered

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
