"""`cydispatch bench`: every mode against the same workloads, interleaved.

Each round starts every mode afresh and warms each up, then runs each
workload on every mode back to back (close on A B C D, then skew on A B C D,
...), and stops them all; the next round starts the modes one place further
along (B C D A).  Interleaving makes drift on a shared machine hit every mode
alike; medians over rounds and ratios taken within a round are what the
report quotes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

from cydispatch.bench import peers, report, wrk
from cydispatch.bench.catalog import (BASELINE, MODES, REFERENCE, REFERENCE_WORKLOADS,
                                      SLOW_MS, WORKLOADS, Workload)
from cydispatch.bench.server import BareServer, CydispatchServer, ServerProcess

@dataclass(frozen=True)
class BenchConfig:
    workers: int
    duration: int       # seconds per workload run (wrk takes whole seconds)
    rounds: int
    connections: int
    modes: tuple[str, ...]
    workloads: tuple[str, ...]
    warmup: int = 1
    threads: int = 1    # wrk threads; one leaves the most CPU to the server
    # CPUs for wrk alone; the servers get the others.  Empty: all share all.
    client_cpus: tuple[int, ...] = ()
    # The app every server runs; empty: cydispatch's built-in app (no peers).
    app: str = ""
    app_dir: str = "."
    interface: str = "asgi"     # of `app`, as the peers need it said
    app_threads: int = 10       # a WSGI app's thread pool, in every server
    peers: tuple[str, ...] = ()

    def all_modes(self) -> tuple[str, ...]:
        """cydispatch's modes, then the peers: the order of the first round."""
        return self.modes + self.peers

    def server_cpus(self) -> tuple[int, ...]:
        return tuple(sorted(os.sched_getaffinity(0) - set(self.client_cpus)))

    def pinned(self, cpus: tuple[int, ...]) -> tuple[str, ...]:
        """A command prefix that runs a command on `cpus` (none when sharing)."""
        if not self.client_cpus:
            return ()
        return ("taskset", "-c", ",".join(map(str, cpus)))


def start_server(mode: str, config: BenchConfig) -> ServerProcess:
    """Start `mode`'s server; not ready yet: see ServerProcess.wait_ready."""
    # Started on the server CPUs, a server pins its workers within them.
    wrapper = config.pinned(config.server_cpus())
    if mode in peers.PEERS:
        return peers.PeerServer(mode, config.app, config.interface, config.workers,
                                config.app_threads, config.app_dir, wrapper=wrapper)
    if MODES[mode] is None:
        return BareServer(workers=config.workers, wrapper=wrapper)
    app = ()
    if config.app:
        app = ("--app-dir", config.app_dir, "--interface", config.interface,
               "--threads", str(config.app_threads), config.app)
    return CydispatchServer(*MODES[mode], "--log-level", "info", *app,
                            workers=config.workers, wrapper=wrapper)


def run_workload(server: ServerProcess, workload: Workload, config: BenchConfig,
                 duration: int) -> wrk.WrkResult:
    return wrk.run(server.url, connections=config.connections, threads=config.threads,
                   duration=duration, close=workload.close,
                   slow_every=workload.slow_every, slow_path=f"/slow?ms={SLOW_MS}",
                   count_workers=workload.count_workers,
                   wrapper=config.pinned(config.client_cpus))


def measure_round(config: BenchConfig, round_number: int, progress: Progress,
                  started: float) -> list[dict]:
    """Start every mode, run each workload on all of them in turn, stop them.

    A shared host has slow spells that last tens of seconds: on the EPYC
    host of 2026-12-07 one mode's whole block of four workloads (about 30 s)
    ran at a third of its speed while the mode run before it was fine, which
    put one round's dispatch/shared ratios at 0.14x and 2.6x.  Runs of one
    workload on every mode follow each other within seconds, so a spell
    slows the runs a ratio compares alike, or few of them.  Idle meanwhile,
    the other servers take no CPU.
    """
    modes = config.all_modes()
    turn = (round_number - 1) % len(modes)
    order = modes[turn:] + modes[:turn]
    records = []
    with contextlib.ExitStack() as running:
        servers = {}
        for mode in order:
            server = start_server(mode, config)
            running.callback(server.stop)   # also if it never gets ready
            server.wait_ready()
            # Warm up: the first connections pay for imports, allocations
            # and cold kernel caches, in every mode alike.
            for name in ("keepalive", "close") if config.warmup else ():
                run_workload(server, WORKLOADS[name], config, config.warmup)
            servers[mode] = server
        for name in config.workloads:
            for mode in order:
                if name in workloads_for(mode, config):
                    progress.show(round_number, mode, name)
                    records.append(measure(servers[mode], mode, name, config,
                                           round_number, started))
    return records


def measure(server: ServerProcess, mode: str, name: str, config: BenchConfig,
            round_number: int, started: float) -> dict:
    """One wrk run of workload `name` against `server`: its record."""
    at = time.monotonic() - started
    cpu_before = server.cpu_seconds()
    ticks_before = cpu_ticks(os.sched_getaffinity(0))
    result = run_workload(server, WORKLOADS[name], config, config.duration)
    primary_cpu = server.cpu_seconds() - cpu_before
    stolen = stolen_percent(ticks_before, cpu_ticks(os.sched_getaffinity(0)))
    return {
        "round": round_number, "mode": mode, "workload": name,
        "at_s": round(at, 1),   # since the benchmark began
        "primary_cpu_s": round(primary_cpu, 3),
        "primary_cpu_us_per_request": (
            round(primary_cpu * 1e6 / result.requests, 2) if result.requests else None),
        "primary_peak_rss_kb": server.peak_rss_kb(),
        "host_stolen_pct": stolen,
        "wrk": result.to_dict(),
    }


def cpu_ticks(cpus: set[int], stat: str = "/proc/stat") -> tuple[int, int]:
    """(stolen, all) clock ticks of `cpus` so far, from /proc/stat.

    Stolen time is time the hypervisor gave these virtual CPUs' host to
    someone else while they had work: a run with much of it measured the
    neighbours on the host as much as the server.  Zero on bare metal.
    """
    stolen = total = 0
    with open(stat) as f:
        for line in f:
            name, _, rest = line.partition(" ")
            if name == "cpu":
                continue    # all CPUs together
            if not name.startswith("cpu"):
                break       # past the CPU lines, which come first
            if int(name[3:]) in cpus:
                # user nice system idle iowait irq softirq steal; guest
                # time is already inside user and nice.
                ticks = [int(field) for field in rest.split()[:8]]
                stolen += ticks[7] if len(ticks) == 8 else 0
                total += sum(ticks)
    return stolen, total


def stolen_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    elapsed = after[1] - before[1]
    if elapsed <= 0:
        return 0.0
    # Some kernels let the idle counters step back a little: keep it a share.
    return round(min(100.0, max(0.0, 100.0 * (after[0] - before[0]) / elapsed)), 1)


def workloads_for(mode: str, config: BenchConfig) -> tuple[str, ...]:
    if mode == REFERENCE:
        return tuple(w for w in config.workloads if w in REFERENCE_WORKLOADS)
    return config.workloads


class Progress:
    """One line on stderr: where the run is and how long is left."""

    def __init__(self, config: BenchConfig) -> None:
        self.total = config.rounds * sum(len(workloads_for(mode, config))
                                         for mode in config.all_modes())
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def show(self, round_number: int, mode: str, workload: str) -> None:
        elapsed = time.monotonic() - self.started
        left = ""
        if self.done:
            left = f", about {elapsed / self.done * (self.total - self.done) / 60:.0f} min left"
        self.done += 1
        line = (f"[round {round_number}] {mode}: {workload} "
                f"(run {self.done}/{self.total}{left})")
        sys.stderr.write(f"\r\033[K{line}" if self.tty else line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(f"done in {(time.monotonic() - self.started) / 60:.1f} min\n")


def machine(config_packages: tuple[str, ...] = ()) -> dict:
    """What the figures were measured on."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    versions = {}
    for package in ("cydispatch", "uvloop", "httptools", *config_packages):
        if package == "node":
            continue    # a program, not a Python package: below
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        banner = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
        versions["wrk"] = banner.split()[1] if banner.startswith("wrk ") else None
    except OSError:
        versions["wrk"] = None
    if "node" in config_packages:
        try:
            versions["node"] = subprocess.run(["node", "--version"], capture_output=True,
                                              text=True).stdout.strip().lstrip("v") or None
        except OSError:
            versions["node"] = None
    return {
        "cpu_model": model,
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def app_packages(app: str) -> tuple[str, ...]:
    """Frameworks whose version belongs with the figures."""
    return tuple(name for name in ("starlette", "fastapi", "flask", "django")
                 if name in app.lower())


def run(config: BenchConfig, out: pathlib.Path) -> dict:
    """The whole benchmark; writes results.json, results.md and results.png to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(config)
    runs = []
    started = time.monotonic()
    for round_number in range(1, config.rounds + 1):
        runs += measure_round(config, round_number, progress, started)
    progress.finish()
    results = {
        "machine": machine(config.peers + app_packages(config.app)),
        "config": dataclasses.asdict(config),
        "baseline": BASELINE,
        "runs": runs,
    }
    results["summary"] = report.summarize(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    plotted = report.plot(results, out / "results.png")
    print(report.table(results))
    if not plotted:
        print("matplotlib is not installed (pip install '.[bench]'): no results.png",
              file=sys.stderr)
    return results
