"""The `cydispatch` command.

Every flag can also be set through an environment variable of the same name,
CYDISPATCH_<FLAG> (CYDISPATCH_WORKERS=4); a flag on the command line wins.
Errors in what the user typed are one line on stderr and exit code 2; an
address that cannot be listened on is one line and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from cydispatch import __version__, logs
from cydispatch.bench.catalog import MODES as BENCH_MODES
from cydispatch.bench.catalog import PEERS
from cydispatch.bench.catalog import WORKLOADS as BENCH_WORKLOADS
from cydispatch.listener import ListenError, parse_admin_address
from cydispatch import settings as settings_module
from cydispatch.settings import ENV_PREFIX, Settings, env_name, flag_name

USAGE_ERROR = 2
STARTUP_ERROR = 1


class CliParser(argparse.ArgumentParser):
    """argparse, with errors in one line instead of a usage dump."""

    def error(self, message: str) -> None:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def argument_type(parse, check=settings_module.nothing_to_check):
    """An argparse type from a converter and a check (see settings.option)."""
    def convert(text: str):
        try:
            value = parse(text)
            check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value
    convert.__name__ = parse.__name__
    return convert


positive_int = argument_type(settings_module.whole_number, settings_module.at_least(1))
non_negative_int = argument_type(settings_module.whole_number, settings_module.at_least(0))


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


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One argument per Settings field, from its declaration.

    Defaults stay None here so that run_serve can tell a flag given on the
    command line (it wins) from one left to the environment or the default.
    """
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        meta = field.metadata
        default = getattr(defaults, field.name)
        help_text = meta["help"]
        if field.type == "bool" or isinstance(default, bool):
            parser.add_argument(flag_name(field), dest=field.name,
                                action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {'on' if default else 'off'})")
            continue
        kwargs = dict(dest=field.name, type=argument_type(meta["parse"], meta["check"]),
                      metavar=meta["metavar"], default=None)
        if meta["choices"]:
            kwargs.update(choices=meta["choices"], metavar=None, type=str)
        shown = meta["shown"] or default
        if not meta["help"].endswith(")") and shown != "":
            help_text += f" (default: {shown})"
        if meta["positional"]:
            del kwargs["dest"]
            parser.add_argument(field.name, nargs="?", help=help_text, **kwargs)
        else:
            parser.add_argument(flag_name(field), help=help_text, **kwargs)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the command line, then CYDISPATCH_* variables, then defaults.

    Raises ValueError with a one-line message naming the flag or the variable.
    """
    values = {}
    for field in dataclasses.fields(Settings):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
            continue
        name = env_name(field)
        text = os.environ.get(name)
        negated = os.environ.get(ENV_PREFIX + "NO_" + field.name.upper())
        if isinstance(field.default, bool) and text is None and negated is not None:
            name, text, invert = ENV_PREFIX + "NO_" + field.name.upper(), negated, True
        else:
            invert = False
        if text is None:
            continue
        parse = settings_module.boolean if isinstance(field.default, bool) \
            else field.metadata["parse"]
        try:
            value = parse(text)
            field.metadata["check"](value)
        except ValueError as exc:
            # Named after the variable: that is where the user must look.
            raise ValueError(f"{name}: {exc}") from None
        values[field.name] = (not value) if invert else value
    return Settings(**values)


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
    add_settings_options(serve)
    serve.set_defaults(run=run_serve)

    bench = commands.add_parser(
        "bench", help="measure every mode side by side with wrk",
        description="Each round: start every mode on a free port and warm it "
                    "up, run each workload with wrk on every mode back to back "
                    "(so that drift hits the runs a ratio compares alike), stop "
                    "them; the next round starts one mode further along.  Writes "
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
    bench.add_argument("--warmup", type=non_negative_int, default=1, metavar="SECONDS",
                       help="after each server starts, this long with keep-alive "
                            "and then with new connections, not measured; 0: none "
                            "(default: %(default)s)")
    bench.add_argument("--connections", type=positive_int, default=64, metavar="N",
                       help="wrk connections (default: %(default)s)")
    bench.add_argument("--modes", nargs="+", choices=list(BENCH_MODES),
                       default=list(BENCH_MODES),
                       metavar="MODE", help="modes to measure, in this order in "
                       "the first round (default: all: %(default)s)")
    bench.add_argument("--workloads", nargs="+", choices=list(BENCH_WORKLOADS),
                       default=list(BENCH_WORKLOADS), metavar="WORKLOAD",
                       help="workloads to run (default: all: %(default)s)")
    bench.add_argument("--client-cpus", type=cpu_list, default=(), metavar="LIST",
                       help="run wrk alone on these CPUs (e.g. 0 or 0,1) and the "
                            "servers on the others, so the load generator does "
                            "not take CPU from the workers (default: all share "
                            "all CPUs)")
    bench.add_argument("--app", default="", metavar="APP",
                       help="benchmark this app (MODULE:ATTRIBUTE) instead of the "
                            "built-in one; it must answer GET / (and GET /slow?ms=N "
                            "for the skew workload, Hello from Worker <pid> for "
                            "balance), as cydispatch.bench.apps:hello, "
                            "cydispatch.bench.apps:hello_wsgi and "
                            "cydispatch.bench.starlette_app:app do")
    bench.add_argument("--app-dir", default=".", metavar="DIR",
                       help="directory to import --app from (default: %(default)s)")
    bench.add_argument("--interface", choices=settings_module.INTERFACES, default="auto",
                       help="of --app (default: %(default)s)")
    bench.add_argument("--threads", type=positive_int, default=Settings().threads,
                       metavar="N", help="threads per worker for a WSGI --app, in "
                       "every server (default: %(default)s)")
    bench.add_argument("--peers", type=peer_list, default=(), metavar="LIST",
                       help="also run --app under these servers, in the same rounds: "
                            f"a comma-separated list of {', '.join(PEERS)} (node: "
                            "Node's cluster, serving the built-in app's routes, "
                            "without --app only)")
    bench.add_argument("--soak", type=positive_int, metavar="MINUTES",
                       help="instead of the rounds: hold the close workload on "
                            "dispatch mode for MINUTES, reloading every minute, and "
                            "report errors, RSS and descriptor counts over time "
                            "(soak.json, soak.md)")
    bench.set_defaults(run=run_bench)

    status = commands.add_parser(
        "status", help="show the workers of a running server (needs its --admin)",
        description="Ask a running primary's admin endpoint for its workers: "
                    "pid, CPU, state, connections, restarts, memory.")
    status.add_argument("--admin", metavar="HOST:PORT", type=argument_type(admin_address),
                        default=os.environ.get(ENV_PREFIX + "ADMIN") or None,
                        help="the server's --admin address (default: $CYDISPATCH_ADMIN)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(run=run_status)
    return parser


def admin_address(text: str) -> str:
    parse_admin_address(text)
    return text


def run_status(args: argparse.Namespace) -> int:
    from cydispatch import status
    if not args.admin:
        print("cydispatch: error: --admin HOST:PORT is required (the address the "
              "server was started with --admin)", file=sys.stderr)
        return USAGE_ERROR
    try:
        view = status.fetch(args.admin)
    except status.Unreachable as exc:
        print(f"cydispatch: error: {exc}", file=sys.stderr)
        return STARTUP_ERROR
    print(status.as_json(view) if args.json else status.table(view))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from cydispatch.supervisor import Arbiter

    from pyworker import tls

    try:
        settings = settings_from(args)
        # Here, once, before any worker: a bad certificate would otherwise
        # be a worker that dies at start, again and again.
        tls.check(settings)
    except ValueError as exc:
        print(f"cydispatch: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    logs.configure(settings.log_level)
    try:
        return Arbiter(settings).run()
    except ListenError as exc:
        print(f"cydispatch: error: {exc}", file=sys.stderr)
        return STARTUP_ERROR


def peer_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    for name in names:
        if name not in PEERS:
            raise argparse.ArgumentTypeError(
                f"{name!r} is not one of {', '.join(PEERS)}")
    return names


def bench_app_interface(args: argparse.Namespace) -> str:
    """Load --app once here, so that a broken one is one line, not a failed run."""
    from pyworker.loader import AppLoadError, load_app
    try:
        settings = Settings(app=args.app, app_dir=args.app_dir, interface=args.interface)
        return load_app(settings)[1]
    except AppLoadError as exc:
        raise ValueError(f"--app: {exc}") from None


def run_bench(args: argparse.Namespace) -> int:
    import pathlib
    import shutil

    from cydispatch.bench import runner, wrk
    from cydispatch.bench.server import ServerFailed

    if shutil.which("wrk") is None:
        print(f"cydispatch: error: {wrk.INSTALL_HINT}", file=sys.stderr)
        return STARTUP_ERROR
    modes, interface = tuple(args.modes), "asgi"
    from cydispatch.bench.peers import BUILTIN_APP_PEERS, missing
    for peer in args.peers:
        if (peer in BUILTIN_APP_PEERS) == bool(args.app):
            print(f"cydispatch: error: --peers {peer} "
                  + ("serves only the built-in app: drop --app" if args.app
                     else "needs --app (it cannot serve the built-in app)"),
                  file=sys.stderr)
            return USAGE_ERROR
        if why := missing(peer):
            print(f"cydispatch: error: --peers: {why}", file=sys.stderr)
            return USAGE_ERROR
    if args.app:
        try:
            interface = bench_app_interface(args)
        except ValueError as exc:
            print(f"cydispatch: error: {exc}", file=sys.stderr)
            return USAGE_ERROR
        # The bare reference server serves only the built-in app.
        modes = tuple(mode for mode in modes if mode != runner.REFERENCE)
        if not modes and not args.peers:
            print(f"cydispatch: error: --modes {runner.REFERENCE} serves only the built-in "
                  "app: with --app, name another mode or --peers", file=sys.stderr)
            return USAGE_ERROR
    config = runner.BenchConfig(
        workers=args.workers, duration=args.duration, rounds=args.rounds,
        warmup=args.warmup, connections=args.connections, modes=modes,
        workloads=tuple(args.workloads), client_cpus=args.client_cpus,
        app=args.app, app_dir=os.path.abspath(args.app_dir), interface=interface,
        app_threads=args.threads, peers=args.peers)
    try:
        if args.soak:
            from cydispatch.bench import soak
            app_args = ()
            if args.app:
                app_args = ("--app-dir", config.app_dir, "--interface", interface,
                            "--threads", str(args.threads), args.app)
            results = soak.soak(args.soak, pathlib.Path(args.out), workers=args.workers,
                                connections=args.connections, app_args=app_args)
            return 0 if results["summary"]["ok"] else 1
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
