"""What `cydispatch bench` can measure: its modes, workloads and peer servers.

Only names and plain data, so that the command line can offer them as choices
without importing the runner (and urllib, subprocess, ...) on every
`cydispatch serve`.
"""

from __future__ import annotations

from dataclasses import dataclass

BASELINE = "reuseport"
# Mode name -> `cydispatch serve` arguments; "bare" is the reference server for
# the worker's HTTP layer.  It answers every path with the hello body and has
# no deferred accept, so it runs the keep-alive workload only: anywhere else
# the comparison would not be like for like.
REFERENCE = "bare"
REFERENCE_WORKLOADS = ("keepalive",)
MODES = {
    "dispatch/least-conn": ("--mode", "dispatch", "--policy", "least-conn"),
    "dispatch/round-robin": ("--mode", "dispatch", "--policy", "round-robin"),
    "reuseport": ("--mode", "reuseport"),
    "shared": ("--mode", "shared"),
    "bare": None,
}


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    close: bool = False         # a new connection for every request
    slow_every: int = 0         # one request in N is /slow?ms=SLOW_MS
    count_workers: bool = False  # count which worker answered each request


SLOW_MS = 20
WORKLOADS = {
    "keepalive": Workload("keepalive", "keep-alive connections, GET /"),
    "close": Workload("close", "a new connection per request (Connection: close)",
                      close=True),
    "skew": Workload("skew", f"like close, but 1 request in 1000 burns {SLOW_MS} ms "
                     "of CPU", close=True, slow_every=1000),
    "balance": Workload("balance", "like close, counting the worker that answers "
                        "each request", close=True, count_workers=True),
}

PEERS = ("uvicorn", "granian", "gunicorn", "node")
# Peers that serve the built-in app's routes themselves; the others serve --app.
BUILTIN_APP_PEERS = ("node",)
