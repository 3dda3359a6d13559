"""Where a new connection's CPU goes on the server side, per process, per mode.

    python bench/connection_cpu.py [--modes dispatch reuseport] [--rounds 3] [--duration 5]
                                   [--against LABEL=COMMAND]

Runs wrk's `close` workload (a new connection per request, 64 at a time) with
wrk alone on the first CPU this process may use and `cydispatch serve` (2
workers) alone on the last, so that everything on the server's CPU is the
server's.  For each mode, in interleaved rounds, it reads /proc before and
after the run and prints, per connection: the primary's CPU, the workers'
(summed), the server CPU's time in softirq (the network stack's deferred
work, which /proc/stat counts apart) and the context switches of the
server's processes.  Medians over the rounds.

`cydispatch bench` says how fast each mode is; this says where the
difference goes (a worker's adoption, the primary, the kernel).  Needs wrk
and at least 2 CPUs.

`--against LABEL=COMMAND` measures each mode under another build too, its
`cydispatch` command, in the same rounds (the order turns each round), and
prints the per-round ratio of the primary's CPU, this build's to that one's:
a change's effect on one machine, whose speed moves between sessions.  To
build an older commit beside this checkout:

    git worktree add /tmp/old REF && python -m venv /tmp/old/venv
    /tmp/old/venv/bin/pip install /tmp/old
    python bench/connection_cpu.py --modes dispatch --against REF=/tmp/old/venv/bin/cydispatch
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from cydispatch.bench import wrk
from cydispatch.bench.runner import cpu_ticks, stolen_percent
from cydispatch.bench.server import CLOCK_TICKS, CYDISPATCH, CydispatchServer, cpu_seconds
from cydispatch.bench.soak import children

CONNECTIONS = 64
WORKERS = 2


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of `pid` so far."""
    switches = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    return switches


def process_counters(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of `pid` so far."""
    return cpu_seconds(pid), context_switches(pid)


def softirq_seconds(cpu: int) -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                return int(line.split()[7]) / CLOCK_TICKS
    raise RuntimeError(f"no cpu{cpu} line in /proc/stat")


def measure(mode: str, client_cpu: int, server_cpu: int, duration: int,
            command: tuple[str, ...] = CYDISPATCH) -> dict:
    server = CydispatchServer("--mode", mode, workers=WORKERS, command=command,
                              wrapper=("taskset", "-c", str(server_cpu))).wait_ready()
    pin_wrk = ("taskset", "-c", str(client_cpu))
    try:
        wrk.run(server.url, connections=CONNECTIONS, threads=1, duration=1, close=True,
                wrapper=pin_wrk)    # warm-up
        workers = children(server.pid)
        processes = [server.pid, *workers]
        before = {pid: process_counters(pid) for pid in processes}
        softirq_before = softirq_seconds(server_cpu)
        ticks_before = cpu_ticks({client_cpu, server_cpu})
        result = wrk.run(server.url, connections=CONNECTIONS, threads=1, duration=duration,
                         close=True, wrapper=pin_wrk)
        softirq = softirq_seconds(server_cpu) - softirq_before
        stolen = stolen_percent(ticks_before, cpu_ticks({client_cpu, server_cpu}))
        after = {pid: process_counters(pid) for pid in processes}
    finally:
        server.stop()
    n = result.requests
    if not n or result.errors:
        sys.exit(f"{mode}: {n} requests, {result.errors} errors: not a measurement")
    cpu = {pid: after[pid][0] - before[pid][0] for pid in processes}
    switches = sum(after[pid][1] - before[pid][1] for pid in processes)
    return {
        "rps": result.rps,
        "primary_us": cpu[server.pid] * 1e6 / n,
        "workers_us": sum(cpu[pid] for pid in workers) * 1e6 / n,
        "softirq_us": softirq * 1e6 / n,
        "switches": switches / n,
        "stolen_pct": stolen,
    }


COLUMNS = (("rps", "req/s", "{:,.0f}"),
           ("primary_us", "primary µs/conn", "{:.1f}"),
           ("workers_us", "workers µs/conn", "{:.1f}"),
           ("softirq_us", "softirq µs/conn (server CPU)", "{:.1f}"),
           ("switches", "context switches/conn", "{:.3f}"),
           ("stolen_pct", "host steal %", "{:.1f}"))

THIS_BUILD = "this build"


def other_build(text: str) -> tuple[str, tuple[str, ...]]:
    """`LABEL=COMMAND` as (label, argv); COMMAND must be an executable."""
    label, sep, command = text.partition("=")
    if not sep or not label or not command:
        raise argparse.ArgumentTypeError(f"expected LABEL=COMMAND, got {text!r}")
    if label == THIS_BUILD:
        raise argparse.ArgumentTypeError(f"{THIS_BUILD!r} names this checkout's build")
    if not os.access(command, os.X_OK) or os.path.isdir(command):
        raise argparse.ArgumentTypeError(f"{command}: not an executable")
    return label, (command,)


def ratio_line(mode: str, label: str, ours: list[dict], theirs: list[dict]) -> str:
    """The primary's CPU per connection, ours over theirs, taken within each round."""
    ratios = [a["primary_us"] / b["primary_us"]
              for a, b in zip(ours, theirs) if b["primary_us"] > 0]
    if not ratios:
        return f"{mode}: no ratio, {label}'s primary used no measurable CPU"
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    return (f"{mode}: the primary's CPU per connection, {THIS_BUILD} / {label}: "
            f"{statistics.median(ratios):.2f} (rounds: {rounds})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["dispatch", "reuseport"],
                        choices=["dispatch", "reuseport", "shared"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per run")
    parser.add_argument("--against", type=other_build, metavar="LABEL=COMMAND",
                        help="also measure another build's `cydispatch` command, "
                             "in the same rounds")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("needs 2 CPUs: one for wrk, one for the server")
    client_cpu, server_cpu = cpus[0], cpus[-1]
    builds = {THIS_BUILD: CYDISPATCH}
    if args.against:
        label, command = args.against
        builds[label] = command
    # Each run is (build, mode); rows are named by the mode, and the build if two.
    plan = [(build, mode) for mode in args.modes for build in builds]
    runs: dict[tuple[str, str], list[dict]] = {run: [] for run in plan}
    for round_number in range(1, args.rounds + 1):
        turn = (round_number - 1) % len(plan)
        for build, mode in plan[turn:] + plan[:turn]:
            print(f"[round {round_number}] {mode} ({build})", file=sys.stderr, flush=True)
            runs[build, mode].append(
                measure(mode, client_cpu, server_cpu, args.duration, builds[build]))
    print(f"`close`, wrk on CPU {client_cpu}, {WORKERS} workers on CPU {server_cpu}, "
          f"medians of {args.rounds} rounds of {args.duration} s\n")
    print("| mode | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for (build, mode), records in runs.items():
        cells = [form.format(statistics.median(r[key] for r in records))
                 for key, _, form in COLUMNS]
        name = f"{mode} ({build})" if len(builds) > 1 else mode
        print(f"| {name} | " + " | ".join(cells) + " |")
    # In the other modes the workers accept, and the primary only watches.
    if args.against and "dispatch" in args.modes:
        print()
        print(ratio_line("dispatch", label, runs[THIS_BUILD, "dispatch"],
                         runs[label, "dispatch"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
