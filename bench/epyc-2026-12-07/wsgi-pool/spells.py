"""What a primary does under the close workload: its queue depth, handoffs, CPU.

    python bench/epyc-2026-12-07/wsgi-pool/spells.py APP WORKERS SECONDS [EXTRA...]
    e.g. ... io_app:app 4 10 --app-dir bench/epyc-2026-12-07/wsgi-pool --threads 4

Starts `cydispatch serve APP --workers WORKERS --admin ... EXTRA...` (the `cydispatch`
of $CYDISPATCH if set, to run another build), runs wrk's close workload (64
connections) for SECONDS after 1 s of warm-up, and prints req/s, p50, p99, the
primary's CPU per request, how many connections it handed twice, and how long
/status says it handed with the slow queue depth.
"""
import json
import os
import re
import sys
import urllib.request

from cydispatch.bench import wrk
from cydispatch.bench.server import CYDISPATCH, CydispatchServer

app, workers, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
command = (os.environ["CYDISPATCH"],) if os.environ.get("CYDISPATCH") else CYDISPATCH
server = CydispatchServer(app, "--admin", "127.0.0.1:0", *sys.argv[4:], workers=workers,
                          command=command)
try:
    server.wait_ready()
    admin = server.wait_for_log(re.compile(r"Admin endpoint on (http://\S+)"))[0].group(1)
    wrk.run(server.url, connections=64, duration=1, close=True)
    cpu_before = server.cpu_seconds()
    result = wrk.run(server.url, connections=64, duration=seconds, close=True)
    primary_us = (server.cpu_seconds() - cpu_before) / max(result.requests, 1) * 1e6
    view = json.load(urllib.request.urlopen(admin + "/status"))
    depth, handed = view["queue_depth"], view["connections"]
    print(f"{result.rps:.0f} req/s, p50 {result.latency_p50_us / 1000:.1f} ms, "
          f"p99 {result.latency_p99_us / 1000:.1f} ms, errors {result.errors}, "
          f"primary {primary_us:.1f} us/request, handed again {handed['redispatched']} "
          f"of {handed['accepted']}, slow depth {depth['slow_seconds']:.1f} s "
          f"in {depth['slow_spells']} spells")
finally:
    server.stop()
