"""The one source of configuration: built from CLI flags and CYDISPATCH_* variables.

Each option is declared once, here, as a field of Settings: its default, its
flag, its help, how a string becomes its value and what values it accepts.
The command line (cli.py) is derived from these declarations, so adding an
option means adding one field.

The primary builds a Settings once and passes it down; workers receive it as
JSON on their command line.  Nothing re-reads flags or the environment later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from collections.abc import Callable
from typing import Any

from cydispatch.listener import parse_admin_address

MODES = ("dispatch", "reuseport", "shared")
POLICIES = ("least-conn", "round-robin")
LOG_LEVELS = ("debug", "info", "warning", "error")
INTERFACES = ("auto", "asgi", "wsgi")
LIFESPAN_MODES = ("auto", "on", "off")
CERT_REQS = ("none", "optional", "required")

ENV_PREFIX = "CYDISPATCH_"
# Workers send a heartbeat once a second; a watchdog shorter than two beats
# would kill workers whose loop merely ran one request of up to a second.
MIN_TIMEOUT = 2.0
# Ceilings, so that a number too large for the kernel or the primary's
# 32-bit counters is a one-line error, not a traceback.
MAX_BACKLOG = 2**31 - 1
MAX_CONNS = 2**31 - 1
MAX_QUEUE_DEPTH = 4096
TRUTHY = ("1", "true", "yes", "on")
FALSY = ("0", "false", "no", "off", "")


def available_cpus() -> list[int]:
    """The CPUs this process may run on, which may be fewer than the machine has."""
    return sorted(os.sched_getaffinity(0))


# Converters: text -> value, raising ValueError with a message for the user.

def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def port_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None


def seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None


def queue_depth(text: str) -> int:
    """A whole number, or `auto` (0)."""
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number or auto") from None
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}, or auto")
    return value


def boolean(text: str) -> bool:
    if text.lower() in TRUTHY:
        return True
    if text.lower() in FALSY:
        return False
    raise ValueError(f"{text!r} is not one of {', '.join(TRUTHY + FALSY[:-1])}")


# Checks: value -> None, raising ValueError with the rest of a sentence that
# starts with the flag's name.

def at_least(minimum: float, unit: str = "") -> Callable[[Any], None]:
    def check(value) -> None:
        if not value >= minimum:
            bound = "must not be negative" if minimum == 0 else f"must be at least {minimum:g}{unit}"
            raise ValueError(f"{bound}, not {value:g}")
    return check


def between(minimum: int, maximum: int, why: str) -> Callable[[Any], None]:
    """A whole-number check with a ceiling, and the reason for the ceiling."""
    def check(value) -> None:
        at_least(minimum)(value)
        if value > maximum:
            raise ValueError(f"must be at most {maximum:,} ({why}), not {value:,}")
    return check


def positive(value) -> None:
    if not value > 0:
        raise ValueError(f"must be positive, not {value:g}")


def one_of(choices: tuple[str, ...]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
    return check


def valid_port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"must be between 0 and 65535, not {value}")


def valid_queue_depth(value: int) -> None:
    if value < 0:
        raise ValueError(f"must be auto or at least 1, not {value}")
    if value > MAX_QUEUE_DEPTH:
        raise ValueError(f"must be at most {MAX_QUEUE_DEPTH:,} (a worker's channel holds "
                         f"4 times as many), not {value:,}")


def valid_timeout(value: float) -> None:
    if value != 0 and not value >= MIN_TIMEOUT:
        raise ValueError(f"must be 0 (off) or at least {MIN_TIMEOUT:g} seconds "
                         f"(workers beat once a second), not {value:g}")


def valid_app(value: str) -> None:
    if not value:
        return
    module, colon, attribute = value.partition(":")
    if not colon or not all(part.isidentifier() for part in module.split(".")) \
            or not all(part.isidentifier() for part in attribute.split(".")):
        raise ValueError(f"{value!r} is not MODULE:ATTRIBUTE (e.g. myproject.main:app)")


def valid_root_path(value: str) -> None:
    if value and (not value.startswith("/") or value.endswith("/")):
        raise ValueError(f"must start with / and not end with one (e.g. /api), not {value!r}")


def parse_networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """--forwarded-allow-ips as networks; None means every peer (`*`)."""
    networks = []
    for item in value.split(","):
        item = item.strip()
        if item == "*":
            return None
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network "
                             "(e.g. 10.0.0.0/8), nor *") from None
    return tuple(networks)


def valid_networks(value: str) -> None:
    parse_networks(value)


def valid_admin(value: str) -> None:
    if value:
        parse_admin_address(value)


def nothing_to_check(value) -> None:
    pass


def option(default, help: str, *, parse: Callable[[str], Any] = str,
           check: Callable[[Any], None] = nothing_to_check, metavar: str | None = None,
           choices: tuple[str, ...] | None = None, positional: bool = False,
           default_factory: Callable[[], Any] | None = None, shown: str | None = None,
           secret: bool = False):
    """A Settings field that is also a command-line option (see cli.build_parser).

    `secret`: left out of the settings' repr, so that no log line or
    traceback that shows them shows it.
    """
    if choices is not None:
        check = one_of(choices)
    # `shown`: how --help names the default, when not by its value (0 is "auto").
    metadata = {"help": help, "parse": parse, "check": check, "metavar": metavar,
                "choices": choices, "positional": positional, "shown": shown}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata,
                                 repr=not secret)
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


@dataclasses.dataclass(frozen=True)
class Settings:
    # The application
    app: str = option(
        "", "the application, as MODULE:ATTRIBUTE (dotted attributes allowed); "
        "without it the built-in hello app serves", check=valid_app,
        metavar="APP", positional=True)
    app_dir: str = option(
        ".", "directory put first on sys.path to import APP from", metavar="DIR")
    factory: bool = option(
        False, "APP is a callable that returns the application")
    interface: str = option(
        "auto", "how to call APP: asgi (ASGI 3), wsgi (PEP 3333), or auto: "
        "ASGI when APP is a coroutine function taking (scope, receive, send)",
        choices=INTERFACES)
    lifespan: str = option(
        "auto", "ASGI lifespan events: on (a startup failure stops the worker), "
        "off, or auto (on, unless the app does not support them)",
        choices=LIFESPAN_MODES)
    root_path: str = option(
        "", "the path prefix the app is mounted under behind a proxy "
        "(ASGI root_path, WSGI SCRIPT_NAME)", check=valid_root_path, metavar="PATH")
    threads: int = option(
        10, "threads per worker that run a WSGI app", parse=whole_number,
        check=at_least(1), metavar="N")
    # Listening and workers
    host: str = option(
        "127.0.0.1", "address to listen on: a name, an IPv4 or IPv6 literal",
        metavar="HOST")
    port: int = option(
        8000, "TCP port; 0 picks a free one, which the log shows",
        parse=port_number, check=valid_port, metavar="PORT")
    workers: int = option(
        None, "worker processes (default: the CPUs this process may use)",
        parse=whole_number, check=at_least(1), metavar="N",
        default_factory=lambda: len(available_cpus()))
    mode: str = option(
        "dispatch", "dispatch: the primary accepts and hands out; reuseport: each "
        "worker has its own SO_REUSEPORT socket; shared: workers accept on one "
        "inherited socket", choices=MODES)
    policy: str = option(
        "least-conn", "how dispatch mode picks a worker for a connection",
        choices=POLICIES)
    pin: bool = option(
        True, "pin each worker to one CPU of those this process may use")
    backlog: int = option(
        2048, "listen backlog: connections the kernel queues",
        parse=whole_number, check=between(1, MAX_BACKLOG, "the kernel caps it at "
                                          "net.core.somaxconn"), metavar="N")
    max_conns: int = option(
        1024, "connections per worker in dispatch mode; when every worker is "
        "full, new ones wait in the backlog", parse=whole_number,
        check=between(1, MAX_CONNS, "more than a process can have "
                      "descriptors for"), metavar="N")
    queue_depth: int = option(
        0, "connections a worker takes in hand before reaching their requests "
        "in dispatch mode (up to 4 times as many wait in its channel, the rest "
        "in the backlog for the first worker to catch up); higher gives more "
        "throughput, lower a shorter tail; auto: 2, times the workers sharing "
        "each CPU, and 2 while some request is slow", parse=queue_depth, check=valid_queue_depth,
        metavar="N", shown="auto")
    # Time limits
    graceful_timeout: float = option(
        30.0, "how long a stop waits for requests in progress",
        parse=seconds, check=at_least(0), metavar="SECONDS")
    keepalive_timeout: float = option(
        5.0, "how long an idle keep-alive connection stays open",
        parse=seconds, check=positive, metavar="SECONDS")
    header_timeout: float = option(
        10.0, "a request's line and headers must arrive within this, counted "
        "from their first byte, however slowly they trickle in (slowloris); "
        "so must a PROXY header, from the connection's start",
        parse=seconds, check=positive, metavar="SECONDS")
    send_timeout: float = option(
        60.0, "a client that has not read any of its response for this long is "
        "disconnected, freeing the app's send (and a WSGI thread)", parse=seconds,
        check=positive, metavar="SECONDS")
    timeout: float = option(
        30.0, "watchdog: a worker whose event loop has not turned for this long "
        "(no heartbeat) is killed and replaced; it must exceed your longest "
        "blocking stretch; 0 turns it off", parse=seconds, check=valid_timeout,
        metavar="SECONDS")
    max_requests: int = option(
        0, "replace a worker, gracefully, after it has served about N requests "
        "(guards against leaks); 0: never", parse=whole_number, check=at_least(0),
        metavar="N")
    max_requests_jitter: int = option(
        0, "add a random 0..J to each worker's --max-requests, so workers are "
        "not all replaced at once", parse=whole_number, check=at_least(0),
        metavar="J")
    # Behind a proxy
    proxy_headers: bool = option(
        True, "apply X-Forwarded-For, -Proto and -Host when the peer is in "
        "--forwarded-allow-ips")
    forwarded_allow_ips: str = option(
        "127.0.0.1,::1", "peers trusted as proxies (their X-Forwarded-* headers, "
        "their PROXY protocol headers): addresses or networks (10.0.0.0/8), "
        "comma-separated, or * for all", check=valid_networks, metavar="LIST")
    proxy_protocol: bool = option(
        False, "every connection starts with a PROXY protocol header (v1 or v2, "
        "HAProxy's send-proxy) from a peer in --forwarded-allow-ips, naming the "
        "client; a connection without one, or from another peer, is closed")
    # TLS (the files are checked by pyworker.tls at startup, in the primary)
    ssl_certfile: str = option(
        "", "serve HTTPS with this PEM certificate (chain); off when not given",
        metavar="FILE")
    ssl_keyfile: str = option(
        "", "its PEM private key (default: in --ssl-certfile)", metavar="FILE")
    ssl_keyfile_password: str = option(
        "", "the password of an encrypted --ssl-keyfile; prefer setting "
        "CYDISPATCH_SSL_KEYFILE_PASSWORD, which other users cannot read in ps",
        metavar="PASSWORD", secret=True)
    ssl_ca_certs: str = option(
        "", "PEM file of the CAs that client certificates are checked against",
        metavar="FILE")
    ssl_cert_reqs: str = option(
        "none", "client certificates: none (not asked for), optional (checked "
        "when sent) or required", choices=CERT_REQS)
    ssl_ciphers: str = option(
        "", "OpenSSL cipher list for TLS 1.2 (default: Python's)", metavar="LIST")
    # Limits and logs
    ws_max_size: int = option(
        16 * 1024 * 1024, "largest WebSocket message accepted, in bytes",
        parse=whole_number, check=at_least(1), metavar="BYTES")
    access_log: bool = option(
        False, "log one line per request (see the README for the format)")
    log_level: str = option("info", "how much the server logs", choices=LOG_LEVELS)
    # Operating it
    admin: str = option(
        "", "serve /metrics (Prometheus), /healthz and /status from the primary "
        "on HOST:PORT (e.g. 127.0.0.1:9000; [::1]:9000); off when not given",
        check=valid_admin, metavar="HOST:PORT")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            try:
                field.metadata["check"](getattr(self, field.name))
            except ValueError as exc:
                raise ValueError(f"{flag_name(field)} {exc}") from None
            except TypeError:
                raise ValueError(f"{flag_name(field)} has the wrong type: "
                                 f"{getattr(self, field.name)!r}") from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


def flag_name(field: dataclasses.Field) -> str:
    if field.metadata["positional"]:
        return field.name.upper()
    return "--" + field.name.replace("_", "-")


def env_name(field: dataclasses.Field) -> str:
    return ENV_PREFIX + field.name.upper()


def auto_queue_depths(workers: int, cpus: int) -> tuple[int, int]:
    """The queue depths when --queue-depth is auto: (fast, slow).

    With a CPU each, 2 keeps the tail short under uneven work (measured in
    bench/RESULTS.md).  Workers that take turns on a CPU catch up only on
    their turn, and each small batch costs a round of context switches on
    that CPU: they get proportionally more at a time, the first depth.
    While a worker is seen in a slow request they are handed 2 again, the
    second: what one holds waits behind its slow request, on a shared CPU
    (Dispatcher._adapt_depth).
    """
    lone = 2
    return lone * -(-workers // max(cpus, 1)), lone
