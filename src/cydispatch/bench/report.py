"""Turn benchmark runs into medians, ratios, a table, Markdown and a plot.

Ratios against the baseline are taken round by round (each mode against the
baseline run of the same round) and the median of those is reported, so a
drift of the machine over the run cancels out instead of landing on one mode.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

PERCENTILES = (("p50", "latency_p50_us"), ("p90", "latency_p90_us"),
               ("p99", "latency_p99_us"), ("p99.9", "latency_p999_us"),
               ("max", "latency_max_us"))
DISPATCH = "dispatch/least-conn"



@dataclass(frozen=True)
class Target:
    """What the project set out to reach, and how to read it off the results."""

    name: str
    measure: str
    comparison: str                 # ">=", "<=" or "<"
    limit: float
    measured: Callable[[dict, dict], float | None]   # (results, summary) -> value
    # Why the target does not apply to this run (None: it does).
    not_applicable: Callable[[dict], str | None] = lambda results: None
    # The per-round values a ratio's median is taken from, to show its spread,
    # each with the larger stolen share of the two runs (None: not measured).
    rounds: Callable[[dict], list[tuple[float, float | None]]] = lambda results: []

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        if self.comparison == ">=":
            return value >= self.limit
        return value <= self.limit if self.comparison == "<=" else value < self.limit


def dispatch_entry(summary: dict, workload: str) -> dict:
    return summary.get(workload, {}).get(DISPATCH, {})


def primary_peak_rss_mb(results: dict) -> float | None:
    sizes = [r["primary_peak_rss_kb"] / 1024 for r in results["runs"]
             if r["mode"].startswith("dispatch")]
    return max(sizes) if sizes else None


def vs_peer(summary: dict, workload: str, peer: str) -> float | None:
    return dispatch_entry(summary, workload).get("vs_peers", {}).get(peer, {}).get("rps")


def without_node(results: dict) -> str | None:
    if "node" not in results["config"].get("peers", ()):
        return "Node's cluster was not run (--peers node)"
    return None


def workers_lack_a_cpu_each(results: dict) -> str | None:
    """Why balance cannot be judged in this run, or None when it can.

    Requests per worker measure how the primary spreads work only when each
    worker has a CPU to itself.  One that shares its CPU with wrk serves,
    and under least-conn gets, less (even counts would mean the other
    worker idles).  Workers that take turns on fewer CPUs serve whenever
    the scheduler runs them: the counts then say who ran, not who was sent
    what, and moving work between them changes nothing a client sees.
    """
    config = results["config"]
    if not config.get("client_cpus"):
        return ("a worker shares its CPU with wrk, and least-conn gives each what it "
                "can serve; judged with --client-cpus")
    usable = results.get("machine", {}).get("cpus_usable")
    server_cpus = usable - len(config["client_cpus"]) if usable else None
    if server_cpus is not None and config["workers"] > server_cpus:
        return (f"{config['workers']} workers take turns on {server_cpus} CPU"
                f"{'s' if server_cpus != 1 else ''}: the counts say whom the scheduler "
                "ran; judged where each worker has a CPU of its own")
    return None


def rounds_of(workload: str, field: str, mode: str = DISPATCH,
              base: str = "") -> Callable[[dict], list[tuple[float, float | None]]]:
    """A Target's `rounds`: the ratios its median comes from (base: the baseline)."""
    return lambda results: per_round_ratios_and_steal(results, workload, mode,
                                                      base or results["baseline"], field)


TARGETS = (
    Target("keep-alive throughput", "dispatch rps / reuseport rps", ">=", 0.97,
           lambda results, summary: dispatch_entry(summary, "keepalive").get("rps_ratio"),
           rounds=rounds_of("keepalive", "rps")),
    Target("keep-alive against Node's cluster", "dispatch rps / node rps", ">=", 1.3,
           lambda results, summary: vs_peer(summary, "keepalive", "node"), without_node,
           rounds_of("keepalive", "rps", base="node")),
    Target("new-connection throughput (close)", "dispatch rps / reuseport rps", ">=", 0.95,
           lambda results, summary: dispatch_entry(summary, "close").get("rps_ratio"),
           rounds=rounds_of("close", "rps")),
    Target("the primary's CPU per new connection", "dispatch primary µs / request, close",
           "<=", 3.5,
           lambda results, summary: dispatch_entry(summary, "close")
           .get("primary_cpu_us_per_request")),
    Target("tail latency under uneven work (skew)", "dispatch p99 / reuseport p99", "<=", 0.5,
           lambda results, summary: dispatch_entry(summary, "skew").get("p99_ratio"),
           rounds=rounds_of("skew", "latency_p99_us")),
    Target("uneven-work tail below a shared socket's", "dispatch p99 / shared p99, skew",
           "<", 1.0,
           lambda results, summary: per_round_ratio(results, "skew", DISPATCH, "shared",
                                                    "latency_p99_us"),
           rounds=rounds_of("skew", "latency_p99_us", base="shared")),
    Target("balance over workers", "dispatch max/min requests per worker", "<=", 1.10,
           lambda results, summary: dispatch_entry(summary, "balance")
           .get("balance", {}).get("max_min"), workers_lack_a_cpu_each),
    Target("worker as fast as bare uvloop + httptools", "reuseport rps / bare rps, keep-alive",
           ">=", 0.95,
           lambda results, summary: per_round_ratio(results, "keepalive", "reuseport", "bare",
                                                    "rps"),
           rounds=rounds_of("keepalive", "rps", mode="reuseport", base="bare")),
    Target("primary memory", "dispatch primary peak RSS, MB", "<=", 40.0,
           lambda results, summary: primary_peak_rss_mb(results)),
)

def runs_of(results: dict, workload: str, mode: str) -> list[dict]:
    return [r for r in results["runs"] if r["workload"] == workload and r["mode"] == mode]


def per_round_ratios_and_steal(results: dict, workload: str, mode: str, base: str,
                               field: str) -> list[tuple[float, float | None]]:
    """mode's field / base's field in each round both ran, in round order, each
    with the larger host steal of the two runs it compares (None: not measured)."""
    base_by_round = {r["round"]: r for r in runs_of(results, workload, base)}
    pairs = []
    for run in runs_of(results, workload, mode):
        other = base_by_round.get(run["round"])
        if other and other["wrk"][field]:
            stolen = [r.get("host_stolen_pct") for r in (run, other)]
            pairs.append((run["wrk"][field] / other["wrk"][field],
                          None if None in stolen else max(stolen)))
    return pairs


def per_round_ratio(results: dict, workload: str, mode: str, base: str,
                    field: str) -> float | None:
    """Median over rounds of mode's field / base's field in the same round."""
    ratios = [ratio for ratio, _ in
              per_round_ratios_and_steal(results, workload, mode, base, field)]
    return statistics.median(ratios) if ratios else None


def host_stolen(results: dict) -> dict | None:
    """How much of the CPUs' time the host gave to others during the runs.

    None for results from before it was measured.
    """
    measured = [r for r in results["runs"] if r.get("host_stolen_pct") is not None]
    if not measured:
        return None
    worst = max(measured, key=lambda r: r["host_stolen_pct"])
    return {"median": statistics.median(r["host_stolen_pct"] for r in measured),
            "max": worst["host_stolen_pct"],
            "worst_run": f"round {worst['round']}, {worst['mode']}, {worst['workload']}"}


# Above this share of stolen time in a run, say that the host moved the figures.
STOLEN_WARNING_PCT = 5.0


def stolen_note(results: dict) -> str | None:
    stolen = host_stolen(results)
    if stolen is None:
        return None
    note = (f"host steal: the hypervisor took {number(stolen['median'], 1)}% of these CPUs' "
            f"time in the median run, {number(stolen['max'], 1)}% at worst "
            f"({stolen['worst_run']})")
    if stolen["max"] > STOLEN_WARNING_PCT:
        note += (f"; runs above {STOLEN_WARNING_PCT:g}% lost that much of the CPUs to other "
                 "guests: read their figures with care")
    return note


def balance(run: dict, workers: int) -> tuple[float, float] | None:
    """(max/min, coefficient of variation) of requests per worker in one run."""
    counts = list(run["wrk"]["workers"].values())
    if not counts:
        return None
    counts += [0] * (workers - len(counts))   # a worker that answered nothing
    mean = statistics.fmean(counts)
    spread = max(counts) / min(counts) if min(counts) else math.inf
    return spread, statistics.pstdev(counts) / mean if mean else 0.0


def all_modes(config: dict) -> list[str]:
    return list(config["modes"]) + list(config.get("peers", ()))


def summarize(results: dict) -> dict:
    config, base = results["config"], results["baseline"]
    peers = list(config.get("peers", ()))
    summary: dict = {}
    for workload in config["workloads"]:
        summary[workload] = {}
        for mode in all_modes(config):
            runs = runs_of(results, workload, mode)
            if not runs:
                continue
            rps = [r["wrk"]["rps"] for r in runs]
            entry = {
                "rounds": len(runs),
                "rps": {"median": statistics.median(rps), "min": min(rps), "max": max(rps)},
                "latency_ms": {name: statistics.median(r["wrk"][field] for r in runs) / 1000
                               for name, field in PERCENTILES},
                "errors": sum(r["wrk"]["errors"] for r in runs),
                "primary_cpu_us_per_request": statistics.median(
                    r["primary_cpu_us_per_request"] or 0 for r in runs),
                "primary_peak_rss_mb": max(r["primary_peak_rss_kb"] for r in runs) / 1024,
            }
            if mode != base and base in config["modes"]:
                entry["rps_ratio"] = per_round_ratio(results, workload, mode, base, "rps")
                entry["p99_ratio"] = per_round_ratio(results, workload, mode, base,
                                                     "latency_p99_us")
            if peers:
                # The same app under the servers users would otherwise pick.
                entry["vs_peers"] = {
                    peer: {"rps": per_round_ratio(results, workload, mode, peer, "rps"),
                           "p99": per_round_ratio(results, workload, mode, peer,
                                                  "latency_p99_us")}
                    for peer in peers if peer != mode}
            spreads = [b for b in (balance(r, config["workers"]) for r in runs) if b]
            if spreads:
                entry["balance"] = {
                    "max_min": statistics.median(s for s, _ in spreads),
                    "cv": statistics.median(cv for _, cv in spreads),
                }
            summary[workload][mode] = entry
    summary["targets"] = targets(results, summary)
    return summary


def targets(results: dict, summary: dict) -> list[dict]:
    checks = []
    for target in TARGETS:
        value = target.measured(results, summary)
        why_not = target.not_applicable(results)
        pairs = target.rounds(results)
        rounds = [ratio for ratio, _ in pairs]
        # Rounds where the host took little from either run compared; None
        # where steal was not measured.
        quiet = ([ratio for ratio, stolen in pairs if stolen <= STOLEN_WARNING_PCT]
                 if pairs and all(stolen is not None for _, stolen in pairs) else None)
        checks.append({"target": target.name, "measure": target.measure,
                       "limit": f"{target.comparison} {target.limit:g}",
                       "measured": value, "met": None if why_not else target.met(value),
                       "not_applicable": why_not,
                       "rounds": rounds,
                       "quiet_rounds": quiet,
                       # Met by the median, yet missed in some round (or the
                       # reverse): the verdict could flip on a re-run.
                       "split": len({target.met(r) for r in rounds}) > 1})
    return checks


def spread(check: dict) -> str:
    """' (rounds 0.91-1.04, missed in some)' for a target measured round by round."""
    rounds = check.get("rounds")
    if not rounds or len(rounds) < 2:
        return ""
    text = f" (rounds {number(min(rounds))}-{number(max(rounds))}"
    if check.get("split") and check.get("met") is not None:
        text += ", missed in some" if check.get("met") else ", met in some"
    quiet = check.get("quiet_rounds")
    if quiet is not None and len(quiet) < len(rounds):
        # Some rounds ran while the host took much of the CPUs: what the
        # others alone say, since a busy host can favour one mode.
        text += (f"; {number(statistics.median(quiet))} over the {len(quiet)} of "
                 f"{len(rounds)} rounds under {STOLEN_WARNING_PCT:g}% steal"
                 if quiet else f"; no round under {STOLEN_WARNING_PCT:g}% steal")
    return text + ")"

def number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:,.{digits}f}"


def rows(results: dict) -> list[list[str]]:
    peers = list(results["config"].get("peers", ()))
    header = ["workload", "mode", "req/s median", "min-max", "vs reuseport",
              "p50 ms", "p99 ms", "p99.9 ms", "p99 vs reuseport", "balance max/min",
              "primary µs/req", "errors"]
    for peer in peers:
        header += [f"vs {peer}", f"p99 vs {peer}"]
    table = [header]
    summary = results["summary"]
    for workload in results["config"]["workloads"]:
        for mode, entry in summary[workload].items():
            rps, latency = entry["rps"], entry["latency_ms"]
            versus = []
            for peer in peers:
                ratios = entry.get("vs_peers", {}).get(peer, {})
                versus += [number(ratios.get("rps")) + ("x" if ratios.get("rps") else ""),
                           number(ratios.get("p99")) + ("x" if ratios.get("p99") else "")]
            table.append([
                workload, mode, number(rps["median"], 0),
                f"{number(rps['min'], 0)}-{number(rps['max'], 0)}",
                number(entry.get("rps_ratio")) + ("x" if entry.get("rps_ratio") else ""),
                number(latency["p50"]), number(latency["p99"]), number(latency["p99.9"]),
                number(entry.get("p99_ratio")) + ("x" if entry.get("p99_ratio") else ""),
                number(entry.get("balance", {}).get("max_min")),
                number(entry["primary_cpu_us_per_request"], 1), str(entry["errors"]),
                *versus,
            ])
    return table


def table(results: dict) -> str:
    """The summary as aligned text, for the terminal."""
    table = rows(results)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("")
    lines += [f"{'met ' if t['met'] else 'MISSED' if t['met'] is False else 'n/a   '} "
              f"{t['target']}: {t['measure']} {number(t['measured'])}{spread(t)} "
              f"(target {t['limit']})"
              + (f"; n/a: {t['not_applicable']}" if t.get("not_applicable") else "")
              for t in results["summary"]["targets"]]
    note = stolen_note(results)
    if note:
        lines += ["", note]
    return "\n".join(lines)


def placement(config: dict) -> str:
    if not config.get("client_cpus"):
        return "on the same CPUs as the servers"
    return (f"alone on CPU {','.join(map(str, config['client_cpus']))}, the servers on "
            "the others")


def markdown(results: dict) -> str:
    machine, config = results["machine"], results["config"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    table = rows(results)
    lines = [
        "# cydispatch benchmark results",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpus_usable']} usable CPUs "
        f"({machine['cpus_online']} online), Linux {machine['kernel']}, "
        f"Python {machine['python']}; {versions}.",
        "",
        f"Run: {config['rounds']} interleaved rounds, {config['duration']} s per workload, "
        f"{config['connections']} connections, {config['workers']} workers, "
        f"wrk with {config['threads']} thread(s) {placement(config)}.  "
        f"App: {config.get('app') or 'the built-in app'}.  Medians over "
        "rounds; ratios are taken within each round (against reuseport, and against each "
        "peer server), then the median.",
        "",
        "| " + " | ".join(table[0]) + " |",
        "|" + "---|" * len(table[0]),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    lines += ["", "## Targets", "", "| target | measure | measured | target | |",
              "|---|---|---|---|---|"]
    for t in results["summary"]["targets"]:
        verdict = "met" if t["met"] else "**missed**" if t["met"] is False else "not measured"
        if t.get("not_applicable"):
            verdict = f"not a target here: {t['not_applicable']}"
        lines.append(f"| {t['target']} | {t['measure']} | {number(t['measured'])}{spread(t)} "
                     f"| {t['limit']} | {verdict} |")
    note = stolen_note(results)
    if note:
        lines += ["", note[0].upper() + note[1:] + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> bool:
    """Throughput per mode and workload, and p99 per mode; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot

    summary, config = results["summary"], results["config"]
    modes = all_modes(config)
    workloads = [w for w in config["workloads"] if w != "balance"]
    figure, (throughput, tail) = pyplot.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        medians, low, high = [], [], []
        for workload in workloads:
            rps = summary[workload].get(mode, {}).get("rps")
            medians.append(rps["median"] if rps else 0)
            low.append(rps["median"] - rps["min"] if rps else 0)
            high.append(rps["max"] - rps["median"] if rps else 0)
        positions = [k + (i - (len(modes) - 1) / 2) * width for k in range(len(workloads))]
        throughput.bar(positions, medians, width, yerr=[low, high], capsize=2, label=mode)
        p99 = [summary[w].get(mode, {}).get("latency_ms", {}).get("p99", 0) for w in workloads]
        tail.bar(positions, p99, width, label=mode)
    for axes, title, unit in ((throughput, "Throughput (median, min-max)", "requests/s"),
                              (tail, "p99 latency (median)", "ms")):
        axes.set_xticks(range(len(workloads)), workloads)
        axes.set_title(title)
        axes.set_ylabel(unit)
        axes.grid(axis="y", alpha=0.3)
    throughput.legend(fontsize="small")
    figure.suptitle(f"{config['workers']} workers, {config['connections']} connections, "
                    f"{config['rounds']} interleaved rounds of {config['duration']} s, "
                    f"wrk {placement(config)} - {results['machine']['cpu_model']}",
                    fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return True
