"""`cydispatch bench --soak MINUTES`: hold the `close` workload, reload every minute.

What a long run shows that the interleaved rounds do not: errors around
reloads, and growth of the primary's memory or descriptors (a leak of one fd
or a few bytes per connection is invisible in 5 s and fatal in a week).
One wrk run per minute, a SIGHUP half-way through each, and a sample of the
processes every few seconds; written to soak.json and soak.md.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import statistics
import sys
import threading
import time

from cydispatch.bench import wrk
from cydispatch.bench.server import CydispatchServer

SLICE_SECONDS = 60
SAMPLE_SECONDS = 5.0
# What counts as growth: the last minute's median against the first's.
RSS_GROWTH_LIMIT = 0.05


def children(pid: int) -> list[int]:
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(child) for child in f.read().split()]
        except FileNotFoundError:
            pass    # the thread ended
    return pids


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(primary: int) -> dict:
    """The primary's and the workers' RSS and descriptors, now."""
    workers = {}
    for pid in children(primary):
        try:
            workers[pid] = (rss_kb(pid), fd_count(pid))
        except (FileNotFoundError, ProcessLookupError):
            pass    # exited while we looked (a reload)
    return {
        "t": time.monotonic(),
        "primary_rss_kb": rss_kb(primary),
        "primary_fds": fd_count(primary),
        "workers": len(workers),
        "worker_rss_kb": sorted(rss for rss, _ in workers.values()),
        "worker_fds": sorted(fds for _, fds in workers.values()),
    }


class Sampler(threading.Thread):
    def __init__(self, primary: int, every: float) -> None:
        super().__init__(daemon=True)
        self.primary = primary
        self.every = every
        self.samples: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            try:
                self.samples.append(sample(self.primary))
            except (FileNotFoundError, ProcessLookupError):
                return  # the primary is gone: the main thread will say so


def soak(minutes: int, out: pathlib.Path, *, workers: int = 2, connections: int = 64,
         app_args: tuple[str, ...] = (), slice_seconds: float = SLICE_SECONDS,
         sample_seconds: float = SAMPLE_SECONDS) -> dict:
    """`minutes` slices of `slice_seconds` (a minute, but for tests)."""
    out.mkdir(parents=True, exist_ok=True)
    server = CydispatchServer("--log-level", "info", *app_args,
                              workers=workers).wait_ready()
    sampler = Sampler(server.pid, sample_seconds)
    slices = []
    started = time.monotonic()
    try:
        sampler.start()
        for minute in range(1, minutes + 1):
            reload = threading.Timer(slice_seconds / 2, server.proc.send_signal,
                                     (signal.SIGHUP,))
            reload.start()
            result = wrk.run(server.url, connections=connections, threads=1,
                             duration=slice_seconds, close=True)
            reload.join()
            slices.append({"minute": minute, "wrk": result.to_dict(),
                           "at": time.monotonic() - started})
            print(f"minute {minute}/{minutes}: {result.requests:,} requests, "
                  f"{result.errors} errors", file=sys.stderr)
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{server.log}")
        reloads = len(server.find(r"Reload complete"))
    finally:
        sampler.done.set()
        # A sample taken while the server stops would count the listener
        # already closed: the last one ends before the stop begins.
        if sampler.is_alive():
            sampler.join()
        server.stop()
    results = {"minutes": minutes, "slice_seconds": slice_seconds,
               "workers": workers, "connections": connections,
               "app": list(app_args), "reloads_completed": reloads,
               "slices": slices, "samples": [
                   {**s, "t": round(s["t"] - started, 1)} for s in sampler.samples]}
    results["summary"] = summarize(results)
    (out / "soak.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "soak.md").write_text(markdown(results))
    print(markdown(results))
    return results


def by_minute(results: dict) -> list[list[dict]]:
    minutes = [[] for _ in results["slices"]]
    for s in results["samples"]:
        index = min(int(s["t"] // results["slice_seconds"]), len(minutes) - 1)
        minutes[index].append(s)
    return minutes


def summarize(results: dict) -> dict:
    """Totals, and the verdict: no error, every reload done, nothing that grows.

    The primary lives through the whole soak, so it is what could leak: its
    memory and its descriptors (its lowest count in each minute: a
    successor's channel comes and goes during each reload).  Workers are
    replaced every minute; their memory from one minute to the next says
    whether what each new one starts with grows.
    """
    minutes = [m for m in by_minute(results) if m]
    first, last = minutes[0], minutes[-1]

    def median(samples: list[dict], key: str) -> float:
        return statistics.median(s[key] for s in samples)

    def worker_median(samples: list[dict]) -> float:
        return statistics.median(kb for s in samples for kb in s["worker_rss_kb"])

    rss_first, rss_last = median(first, "primary_rss_kb"), median(last, "primary_rss_kb")
    rss_growth = rss_last / rss_first - 1
    worker_growth = worker_median(last) / worker_median(first) - 1
    fds = [s["primary_fds"] for s in results["samples"]]
    lowest_fds = [min(s["primary_fds"] for s in minute) for minute in minutes]
    errors = sum(s["wrk"]["errors"] for s in results["slices"])
    return {
        "requests": sum(s["wrk"]["requests"] for s in results["slices"]),
        "errors": errors,
        "primary_rss_growth": round(rss_growth, 4),
        "worker_rss_growth": round(worker_growth, 4),
        "primary_fds_min_max": [min(fds), max(fds)],
        "primary_fds_lowest_by_minute": lowest_fds,
        "ok": (errors == 0 and results["reloads_completed"] == results["minutes"]
               and rss_growth < RSS_GROWTH_LIMIT and worker_growth < RSS_GROWTH_LIMIT
               and max(lowest_fds) <= lowest_fds[0]),
    }


def markdown(results: dict) -> str:
    summary = results["summary"]
    lines = [
        f"Soak: {results['minutes']} x {results['slice_seconds']:g} s of the close workload ({results['connections']} "
        f"connections, {results['workers']} workers), SIGHUP half-way through each; "
        f"{results['reloads_completed']} reloads completed.",
        "",
        "| minute | requests | errors | primary RSS MB | primary fds | worker RSS MB "
        "(each) | worker fds (each) |",
        "|---|---|---|---|---|---|---|",
    ]
    for slice_, samples in zip(results["slices"], by_minute(results), strict=True):
        if not samples:
            continue
        last = samples[-1]
        lines.append(
            f"| {slice_['minute']} | {slice_['wrk']['requests']:,} | {slice_['wrk']['errors']} "
            f"| {statistics.median(s['primary_rss_kb'] for s in samples) / 1024:.1f} "
            f"| {min(s['primary_fds'] for s in samples)}-{max(s['primary_fds'] for s in samples)} "
            f"| {', '.join(f'{kb / 1024:.1f}' for kb in last['worker_rss_kb'])} "
            f"| {', '.join(map(str, last['worker_fds']))} |")
    lines += [
        "",
        f"Total: {summary['requests']:,} requests, {summary['errors']} errors; primary RSS "
        f"growth {summary['primary_rss_growth']:+.1%}, workers' "
        f"{summary['worker_rss_growth']:+.1%} (first minute's median to the last's); "
        f"primary fds {summary['primary_fds_min_max'][0]}-{summary['primary_fds_min_max'][1]}, "
        f"their lowest in each minute "
        f"{'-'.join(map(str, sorted(set(summary['primary_fds_lowest_by_minute']))))}."
        f" {'OK' if summary['ok'] else 'NOT OK'}.",
    ]
    return "\n".join(lines) + "\n"
