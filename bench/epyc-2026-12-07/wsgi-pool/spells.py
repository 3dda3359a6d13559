"""How long a primary hands with the slow queue depth under the close workload.

    python bench/epyc-2026-12-07/wsgi-pool/spells.py cydispatch.bench.apps:hello_wsgi 4 10 --threads 2

Starts `cydispatch serve APP --workers N --admin ... EXTRA...`, runs wrk's close workload
(64 connections) for SECONDS, and prints req/s, p99 and what /status says of the depth.
"""
import json
import re
import sys
import urllib.request

from cydispatch.bench import wrk
from cydispatch.bench.server import CydispatchServer

app, workers, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
server = CydispatchServer(app, "--admin", "127.0.0.1:0", *sys.argv[4:], workers=workers)
try:
    server.wait_ready()
    admin = server.wait_for_log(re.compile(r"Admin endpoint on (http://\S+)"))[0].group(1)
    result = wrk.run(server.url, connections=64, duration=seconds, close=True)
    depth = json.load(urllib.request.urlopen(admin + "/status"))["queue_depth"]
    print(f"{result.rps:.0f} req/s, p99 {result.latency_p99_us / 1000:.1f} ms, "
          f"slow depth {depth['slow_seconds']:.1f} s of {seconds} in {depth['slow_spells']} spells")
finally:
    server.stop()
