"""The `cydispatch` command.

Every flag can also be set through an environment variable of the same name,
CYDISPATCH_<FLAG> (CYDISPATCH_WORKERS=4); a flag on the command line wins.
Errors in what the user typed are one line on stderr and exit code 2; an
address that cannot be listened on is one line and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from cydispatch import __version__, logs
from cydispatch.bench.runner import MODES as BENCH_MODES
from cydispatch.bench.runner import WORKLOADS as BENCH_WORKLOADS
from cydispatch.listener import ListenError
from cydispatch.settings import LOG_LEVELS, MODES, POLICIES, Settings, env_default

USAGE_ERROR = 2
STARTUP_ERROR = 1


class CliParser(argparse.ArgumentParser):
    """argparse, with errors in one line instead of a usage dump."""

    def error(self, message: str) -> None:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def at_least(minimum: int):
    """An argparse type: a whole number no smaller than `minimum`."""
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            bound = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
            raise argparse.ArgumentTypeError(f"{bound}, not {value}")
        return value
    return whole_number


positive_int = at_least(1)
whole_number = at_least(0)


def depth(text: str) -> int:
    """--queue-depth: a whole number >= 1, or `auto` (0)."""
    if text == "auto":
        return 0
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, or auto") from None


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, not {value}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def cpu_list(text: str) -> tuple[int, ...]:
    try:
        cpus = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of CPU numbers") from None
    usable = os.sched_getaffinity(0)
    if not set(cpus) <= usable:
        raise argparse.ArgumentTypeError(
            f"CPUs {sorted(set(cpus) - usable)} are not among those usable here "
            f"({sorted(usable)})")
    if set(cpus) == usable:
        raise argparse.ArgumentTypeError("leaves no CPU for the servers")
    return cpus


def env_flag(name: str) -> bool:
    return str(env_default(name, "")).lower() in ("1", "true", "yes", "on")


def build_parser() -> CliParser:
    defaults = Settings()
    parser = CliParser(
        prog="cydispatch",
        description="Run a Python HTTP service on every core: one primary "
                    "accepts connections and hands them to CPU-pinned workers.",
    )
    parser.add_argument("--version", action="version",
                        version=f"cydispatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="start the server",
        description="Start a primary and its workers.  In dispatch mode the "
                    "primary accepts every connection and hands it to the "
                    "worker the policy picks; reuseport and shared are the "
                    "baselines the kernel balances.  Each flag can also be "
                    "set as CYDISPATCH_<FLAG>, e.g. CYDISPATCH_WORKERS=4.")
    serve.add_argument("--host", default=env_default("host", defaults.host),
                       metavar="HOST",
                       help="address to listen on: a name, an IPv4 or IPv6 "
                            "literal (default: %(default)s)")
    serve.add_argument("--port", type=port_number,
                       default=env_default("port", defaults.port),
                       metavar="PORT",
                       help="TCP port; 0 picks a free one, which the log shows "
                            "(default: %(default)s)")
    serve.add_argument("--workers", type=positive_int,
                       default=env_default("workers", defaults.workers),
                       metavar="N",
                       help="worker processes (default: %(default)s, the CPUs "
                            "this process may use)")
    serve.add_argument("--mode", choices=MODES,
                       default=env_default("mode", defaults.mode),
                       help="dispatch: the primary accepts and hands out; "
                            "reuseport: each worker has its own SO_REUSEPORT "
                            "socket; shared: workers accept on one inherited "
                            "socket (default: %(default)s)")
    serve.add_argument("--policy", choices=POLICIES,
                       default=env_default("policy", defaults.policy),
                       help="how dispatch mode picks a worker for a connection "
                            "(default: %(default)s)")
    serve.add_argument("--no-pin", action="store_true",
                       default=env_flag("no_pin"),
                       help="do not pin each worker to one CPU")
    serve.add_argument("--backlog", type=positive_int,
                       default=env_default("backlog", defaults.backlog),
                       metavar="N",
                       help="listen backlog: connections the kernel queues "
                            "(default: %(default)s)")
    serve.add_argument("--max-conns", type=positive_int,
                       default=env_default("max_conns", defaults.max_conns),
                       metavar="N",
                       help="connections per worker in dispatch mode; when "
                            "every worker is full, new ones wait in the "
                            "backlog (default: %(default)s)")
    serve.add_argument("--queue-depth", type=depth,
                       default=env_default("queue_depth", "auto"),
                       metavar="N",
                       help="connections a worker may hold unanswered in "
                            "dispatch mode; beyond that, new ones wait in the "
                            "backlog for the first worker to catch up; higher "
                            "gives more throughput, lower a shorter tail; auto: "
                            "2, times the workers sharing each CPU "
                            "(default: %(default)s)")
    serve.add_argument("--graceful-timeout", type=seconds,
                       default=env_default("graceful_timeout",
                                           defaults.graceful_timeout),
                       metavar="SECONDS",
                       help="how long a stop waits for requests in progress "
                            "(default: %(default)s)")
    serve.add_argument("--keepalive-timeout", type=seconds,
                       default=env_default("keepalive_timeout",
                                           defaults.keepalive_timeout),
                       metavar="SECONDS",
                       help="how long an idle keep-alive connection stays "
                            "open (default: %(default)s)")
    serve.add_argument("--timeout", type=seconds,
                       default=env_default("timeout", defaults.timeout),
                       metavar="SECONDS",
                       help="watchdog: a worker whose event loop has not turned "
                            "for this long (no heartbeat) is killed and replaced; "
                            "it must exceed your longest request; 0 turns it off "
                            "(default: %(default)s)")
    serve.add_argument("--max-requests", type=whole_number,
                       default=env_default("max_requests", defaults.max_requests),
                       metavar="N",
                       help="replace a worker, gracefully, after it has served "
                            "about N requests (guards against leaks); 0: never "
                            "(default: %(default)s)")
    serve.add_argument("--max-requests-jitter", type=whole_number,
                       default=env_default("max_requests_jitter",
                                           defaults.max_requests_jitter),
                       metavar="J",
                       help="add a random 0..J to each worker's --max-requests, "
                            "so workers are not all replaced at once "
                            "(default: %(default)s)")
    serve.add_argument("--log-level", choices=LOG_LEVELS,
                       default=env_default("log_level", defaults.log_level),
                       help="(default: %(default)s)")
    serve.set_defaults(run=run_serve)

    bench = commands.add_parser(
        "bench", help="measure every mode side by side with wrk",
        description="Start each mode in turn on a free port, warm it up, run "
                    "every workload with wrk, stop it; repeat for each round, "
                    "interleaving the modes so drift hits them alike.  Writes "
                    "results.json, results.md and results.png to --out.  "
                    "Workloads: " + "; ".join(f"{w.name}: {w.description}"
                                             for w in BENCH_WORKLOADS.values()) + ".")
    bench.add_argument("--out", required=True, metavar="DIR",
                       help="directory for the results")
    bench.add_argument("--workers", type=positive_int, default=defaults.workers,
                       metavar="N", help="workers in every mode (default: %(default)s)")
    bench.add_argument("--duration", type=positive_int, default=5, metavar="SECONDS",
                       help="length of each workload run (default: %(default)s)")
    bench.add_argument("--rounds", type=positive_int, default=5, metavar="N",
                       help="interleaved rounds (default: %(default)s)")
    bench.add_argument("--connections", type=positive_int, default=64, metavar="N",
                       help="wrk connections (default: %(default)s)")
    bench.add_argument("--modes", nargs="+", choices=list(BENCH_MODES),
                       default=list(BENCH_MODES),
                       metavar="MODE", help="modes to measure, in this order "
                       "(default: all: %(default)s)")
    bench.add_argument("--workloads", nargs="+", choices=list(BENCH_WORKLOADS),
                       default=list(BENCH_WORKLOADS), metavar="WORKLOAD",
                       help="workloads to run (default: all: %(default)s)")
    bench.add_argument("--client-cpus", type=cpu_list, default=(), metavar="LIST",
                       help="run wrk alone on these CPUs (e.g. 0 or 0,1) and the "
                            "servers on the others, so the load generator does "
                            "not take CPU from the workers (default: all share "
                            "all CPUs)")
    bench.set_defaults(run=run_bench)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    from cydispatch.supervisor import Arbiter

    try:
        settings = Settings(
            host=args.host, port=int(args.port), workers=int(args.workers),
            mode=args.mode, policy=args.policy, pin=not args.no_pin,
            backlog=int(args.backlog), max_conns=int(args.max_conns),
            queue_depth=int(args.queue_depth),
            graceful_timeout=float(args.graceful_timeout),
            keepalive_timeout=float(args.keepalive_timeout),
            timeout=float(args.timeout), max_requests=int(args.max_requests),
            max_requests_jitter=int(args.max_requests_jitter),
            log_level=args.log_level)
    except ValueError as exc:
        # Values that came from CYDISPATCH_* variables are checked here.
        print(f"cydispatch: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    logs.configure(settings.log_level)
    try:
        return Arbiter(settings).run()
    except ListenError as exc:
        print(f"cydispatch: error: {exc}", file=sys.stderr)
        return STARTUP_ERROR


def run_bench(args: argparse.Namespace) -> int:
    import pathlib
    import shutil

    from cydispatch.bench import runner, wrk
    from cydispatch.bench.server import ServerFailed

    if shutil.which("wrk") is None:
        print(f"cydispatch: error: {wrk.INSTALL_HINT}", file=sys.stderr)
        return STARTUP_ERROR
    config = runner.BenchConfig(
        workers=args.workers, duration=args.duration, rounds=args.rounds,
        connections=args.connections, modes=tuple(args.modes),
        workloads=tuple(args.workloads), client_cpus=args.client_cpus)
    try:
        runner.run(config, pathlib.Path(args.out))
    except (ServerFailed, wrk.WrkOutputError) as exc:
        print(f"cydispatch: error: {exc}", file=sys.stderr)
        return STARTUP_ERROR
    except KeyboardInterrupt:
        print("\ncydispatch: bench interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
