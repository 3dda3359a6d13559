"""Run wrk, the project's load generator, and read its results as numbers.

wrk has no maintained Python wrapper, and its own summary is formatted for
people ("1.23ms", "45.6k").  Every run here uses one script, wrk.lua, which
shapes the workload from arguments given after `--` and prints its results
as one JSON line; this module builds that command line, runs it and parses
that line.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import subprocess
from dataclasses import dataclass

SCRIPT = pathlib.Path(__file__).with_name("wrk.lua")
MARKER = "CYDISPATCH_WRK_JSON "
INSTALL_HINT = "wrk is not installed; install it with: apt-get install -y wrk"
# wrk stops on its own after the duration; the margin covers a slow start and
# threads finishing their last requests on a loaded machine.
RUN_MARGIN_S = 30.0
OUTPUT_TAIL_CHARS = 2000


class WrkNotFound(RuntimeError):
    """The wrk binary is not installed."""


class WrkOutputError(RuntimeError):
    """wrk failed, or printed no result line."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration: float  # seconds
    rps: float
    bytes: int
    latency_p50_us: float
    latency_p90_us: float
    latency_p99_us: float
    latency_p999_us: float
    latency_max_us: float
    latency_mean_us: float
    latency_stdev_us: float
    errors_connect: int
    errors_read: int
    errors_write: int
    errors_status: int  # responses with a status above 399
    errors_timeout: int
    workers: dict[int, int]  # worker pid -> responses; empty unless counted

    @property
    def errors(self) -> int:
        return (self.errors_connect + self.errors_read + self.errors_write
                + self.errors_status + self.errors_timeout)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "errors": self.errors}


def output_tail(output: str) -> str:
    return output[-OUTPUT_TAIL_CHARS:].strip()


def parse(output: str) -> WrkResult:
    """Read the result line that wrk.lua's done() printed in wrk's output."""
    lines = [line for line in output.splitlines() if line.startswith(MARKER)]
    if not lines:
        raise WrkOutputError(f"no {MARKER.strip()} line in wrk's output:\n{output_tail(output)}")
    try:
        fields = json.loads(lines[-1][len(MARKER):])
    except json.JSONDecodeError as exc:
        raise WrkOutputError(f"unreadable {MARKER.strip()} line ({exc}):\n{lines[-1]}") from exc
    latency, errors = fields["latency_us"], fields["errors"]
    # wrk.lua writes every number with %.14g (a whole latency reads as an
    # int, a huge count as a float): cast each to its field's type.
    requests = int(fields["requests"])
    duration = fields["duration_us"] / 1e6
    return WrkResult(
        requests=requests,
        duration=duration,
        rps=requests / duration if duration else 0.0,
        bytes=int(fields["bytes"]),
        latency_p50_us=float(latency["p50"]),
        latency_p90_us=float(latency["p90"]),
        latency_p99_us=float(latency["p99"]),
        latency_p999_us=float(latency["p99_9"]),
        latency_max_us=float(latency["max"]),
        latency_mean_us=float(latency["mean"]),
        latency_stdev_us=float(latency["stdev"]),
        errors_connect=int(errors["connect"]),
        errors_read=int(errors["read"]),
        errors_write=int(errors["write"]),
        errors_status=int(errors["status"]),
        errors_timeout=int(errors["timeout"]),
        workers={int(pid): int(count) for pid, count in fields["workers"].items()},
    )


def whole_seconds(seconds: float, what: str) -> str:
    """wrk reads times as whole seconds with a unit: "2s" works, "1.5s" is a usage error."""
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"wrk takes the {what} in whole seconds, at least 1: not {seconds!r}")
    return f"{int(seconds)}s"


def command(url: str, *, connections: int, duration: float, threads: int = 1,
            close: bool = False, slow_every: int = 0, slow_path: str = "/slow?ms=20",
            count_workers: bool = False, timeout: float | None = None,
            wrk: str = "wrk", wrapper: tuple[str, ...] = ()) -> list[str]:
    """The wrk command line for one workload; see wrk.lua for the options after `--`.

    `wrapper` prefixes the command, e.g. ("taskset", "-c", "0") to pin wrk.
    """
    if not 1 <= threads <= connections:
        raise ValueError(f"wrk needs 1 <= threads <= connections: "
                         f"{threads} threads, {connections} connections")
    argv = [*wrapper, wrk, "-t", str(threads), "-c", str(connections),
            "-d", whole_seconds(duration, "duration")]
    if timeout is not None:
        argv += ["--timeout", whole_seconds(timeout, "timeout")]
    argv += ["-s", str(SCRIPT), url, "--"]
    if close:
        argv.append("close=1")
    if slow_every:
        argv += [f"slow_every={slow_every}", f"slow_path={slow_path}"]
    if count_workers:
        argv.append("count_workers=1")
    return argv


def run(url: str, **options) -> WrkResult:
    """Run one workload (options as for `command`) and return its results."""
    argv = command(url, **options)
    if shutil.which(options.get("wrk", "wrk")) is None:
        raise WrkNotFound(INSTALL_HINT)
    try:
        completed = subprocess.run(argv, capture_output=True, text=True,
                                   timeout=options["duration"] + RUN_MARGIN_S)
    except subprocess.TimeoutExpired as exc:
        # Bytes despite text=True: the output was cut off before decoding.
        output = ((exc.stdout or b"") + (exc.stderr or b"")).decode(errors="replace")
        raise WrkOutputError(f"wrk did not finish within {exc.timeout:g} s:\n"
                             f"{output_tail(output)}") from exc
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise WrkOutputError(f"wrk exited with status {completed.returncode}:\n"
                             f"{output_tail(output)}")
    return parse(output)
