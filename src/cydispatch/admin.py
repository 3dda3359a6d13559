"""The admin endpoint (--admin HOST:PORT): metrics, health and status, served by the primary.

It runs in a thread of the primary, never in a worker and never in the
accept loop: the thread only reads what the primary already knows (its
counters, each worker's shared load page, /proc) and the loop's own thread
never waits for it.  Scrapes take the GIL for about a millisecond; the
accept loop holds it only between its waits in epoll.

    GET /metrics   Prometheus text format (OpenMetrics when asked for),
                   from prometheus_client, over a collector of our own
    GET /healthz   200 while serving, 503 before a worker is ready and once
                   a stop has begun, with a small JSON body
    GET /status    the same as JSON, with a row per worker, for
                   `cydispatch status`
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import threading
import time
from typing import Callable

from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString
from prometheus_client.registry import CollectorRegistry

from cydispatch._dispatch import DURATION_BOUNDS
from cydispatch.listener import bind, format_address

log = logging.getLogger("cydispatch.primary")

RESTART_REASONS = ("crash", "watchdog", "recycle", "reload")
WORKER_STATES = ("starting", "ready", "draining")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None     # it exited just now


def snapshot_of(arbiter) -> dict:
    """What the primary knows, as plain data: read from the admin thread.

    Every container is copied before it is walked (one step under the GIL),
    so the loop's thread may change them meanwhile; but an exited worker's
    counts move from its page to the totals under counts_lock, taken here
    too, so that no scrape counts them twice or not at all.  /proc is read
    after the lock is let go: the loop takes it to reap a worker, and must
    not wait on a file read for it.
    """
    with arbiter.counts_lock:
        snapshot = read_snapshot(arbiter)
    for worker in snapshot["workers"]:
        worker["rss_bytes"] = resident_bytes(worker["pid"])
    return snapshot


def read_snapshot(arbiter) -> dict:
    settings = arbiter.settings
    dispatcher = arbiter.dispatcher
    now = time.monotonic()
    workers = []
    live = list(arbiter.workers.values())
    # Request durations of every worker, past and present: one histogram; a
    # live worker's requests are its own histogram's count.
    durations = list(arbiter.durations_done)
    duration_seconds = arbiter.duration_seconds_done
    for worker in live:
        slot = worker.slot
        counts, seconds = dispatcher.durations(worker.channel) if dispatcher \
            else ([0] * len(durations), 0.0)
        durations = [total + count for total, count in zip(durations, counts)]
        duration_seconds += seconds
        if worker.retiring:
            state = "draining"
        elif worker.ready:
            state = "ready"
        else:
            state = "starting"
        opened, queued, _, handed = dispatcher.load(worker.channel) if dispatcher \
            else (0, 0, 0, 0)
        workers.append({
            "worker": slot.index, "pid": worker.pid, "cpu": slot.cpu, "state": state,
            "connections": opened, "queued": queued,
            "requests": sum(counts),
            "handed": handed if settings.mode == "dispatch" else None,
            "restarts": slot.restarts, "rss_bytes": None,     # read by snapshot_of
            "uptime_seconds": round(now - worker.started_at, 3),
        })
    workers.sort(key=lambda w: (w["worker"], w["state"] != "draining"))
    dispatching = dispatcher is not None and settings.mode == "dispatch"
    return {
        "primary": {
            "pid": os.getpid(), "mode": settings.mode,
            "policy": settings.policy if settings.mode == "dispatch" else None,
            "address": arbiter.address, "workers_wanted": len(list(arbiter.slots)),
            "uptime_seconds": round(now - arbiter.started_at, 3),
            "stopping": arbiter.stopping, "reloading": arbiter.slots.reloading,
        },
        "connections": {
            "accepted": dispatcher.accepted if dispatching else None,
            "redispatched": dispatcher.redispatched if dispatching else None,
            "stolen": dispatcher.stolen if dispatching else None,
        },
        # The depth the primary hands with (--queue-depth), and how long it
        # has been shallow because slow requests were being served.
        "queue_depth": {
            "now": dispatcher.queue_depth, "full": dispatcher.full_queue_depth,
            "slow": dispatcher.slow_queue_depth, "slow_spells": dispatcher.slow_spells,
            "slow_seconds": round(dispatcher.slow_seconds, 3),
        } if dispatching else None,
        "restarts": {reason: arbiter.slots.restarts[reason] for reason in RESTART_REASONS},
        "request_durations": {"bounds": list(DURATION_BOUNDS), "counts": durations,
                              "sum_seconds": duration_seconds},
        "messages": {"broadcast": arbiter.router.broadcast_total,
                     "dropped": arbiter.router.dropped_total},
        "workers": workers,
        # Per slot, answered by its workers that have exited: with the live
        # ones' counts, a total that only grows.
        "requests_done": {str(index): done
                          for index, done in sorted(arbiter.slots.requests_done.items())},
    }


def health_of(snapshot: dict) -> tuple[int, dict]:
    """(HTTP status, body): serving while a worker is ready and no stop has begun."""
    states = [w["state"] for w in snapshot["workers"]]
    ready = states.count("ready")
    stopping = snapshot["primary"]["stopping"]
    if stopping:
        status = "stopping"
    elif ready:
        status = "serving"
    else:
        status = "starting"
    body = {"status": status, "workers_ready": ready,
            "workers_starting": states.count("starting"),
            "workers_draining": states.count("draining")}
    return (200 if status == "serving" else 503), body


class PrimaryCollector:
    """prometheus_client collector over a snapshot: no metric objects to keep in step."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot

    def collect(self):
        view = self.snapshot()
        connections = view["connections"]
        if connections["accepted"] is not None:
            yield CounterMetricFamily(
                "cydispatch_connections_accepted",
                "Connections the primary accepted (dispatch mode).",
                value=connections["accepted"])
            yield CounterMetricFamily(
                "cydispatch_connections_redispatched",
                "Connections handed to a second worker: the first never took them "
                "(it died or was stuck) or had no descriptor for them.",
                value=connections["redispatched"])
            yield CounterMetricFamily(
                "cydispatch_connections_stolen",
                "Connections a worker took from a sibling's channel before the sibling "
                "reached them: it was stuck in a slow request, or had several waiting "
                "while this worker had none.",
                value=connections["stolen"])
        depth = view.get("queue_depth")
        if depth is not None:
            yield GaugeMetricFamily(
                "cydispatch_queue_depth",
                "Connections a worker may take in hand before reaching their requests, "
                "as the primary hands now (--queue-depth).", value=depth["now"])
            yield CounterMetricFamily(
                "cydispatch_queue_depth_slow_spells",
                "Times the primary went to the slow queue depth: a worker was seen "
                "15 ms into one request.", value=depth["slow_spells"])
            yield CounterMetricFamily(
                "cydispatch_queue_depth_slow_seconds",
                "Seconds the primary handed with the slow queue depth.",
                value=depth["slow_seconds"])
        restarts = CounterMetricFamily(
            "cydispatch_worker_restarts", "Workers replaced, by why.", labels=["reason"])
        for reason, count in view["restarts"].items():
            restarts.add_metric([reason], count)
        yield restarts
        states = GaugeMetricFamily("cydispatch_workers", "Worker processes, by state.",
                                   labels=["state"])
        for state in WORKER_STATES:
            states.add_metric([state], sum(w["state"] == state for w in view["workers"]))
        yield states
        per_worker = {
            "connections": GaugeMetricFamily(
                "cydispatch_worker_connections",
                "Connections a worker holds open (handed or accepted, not closed).",
                labels=["worker"]),
            "queued": GaugeMetricFamily(
                "cydispatch_worker_queued_connections",
                "Of those, connections whose first request the worker has not reached.",
                labels=["worker"]),
            "rss_bytes": GaugeMetricFamily(
                "cydispatch_worker_resident_memory_bytes",
                "Resident memory of a worker's processes.", labels=["worker"]),
        }
        # During a reload a slot has two processes: their sum is the slot's.
        totals: dict[str, dict[str, float]] = {name: {} for name in per_worker}
        for worker in view["workers"]:
            label = str(worker["worker"])
            for name in per_worker:
                totals[name][label] = totals[name].get(label, 0) + (worker[name] or 0)
        for name, family in per_worker.items():
            for label, value in sorted(totals[name].items()):
                family.add_metric([label], value)
            yield family
        requests = CounterMetricFamily(
            "cydispatch_worker_requests",
            "Requests answered in each worker slot, by its workers past and present "
            "(the request-duration histogram's count, per slot).", labels=["worker"])
        answered = {label: float(done) for label, done in view["requests_done"].items()}
        for worker in view["workers"]:
            label = str(worker["worker"])
            answered[label] = answered.get(label, 0) + worker["requests"]
        for label, value in sorted(answered.items()):
            requests.add_metric([label], value)
        yield requests
        yield request_durations(view["request_durations"])
        yield CounterMetricFamily(
            "cydispatch_messages_broadcast",
            "Messages workers broadcast (cydispatch.cluster), as the primary received them.",
            value=view["messages"]["broadcast"])
        yield CounterMetricFamily(
            "cydispatch_messages_dropped",
            "Deliveries of broadcast messages dropped because a worker's outbox in the "
            "primary was full (the worker was stopped or too slow to read them).",
            value=view["messages"]["dropped"])


def request_durations(durations: dict) -> HistogramMetricFamily:
    """The workers' duration counts (one per bucket) as a cumulative histogram."""
    buckets = []
    below = 0
    for bound, count in zip([*durations["bounds"], float("inf")], durations["counts"]):
        below += count
        buckets.append((floatToGoString(bound), below))
    return HistogramMetricFamily(
        "cydispatch_request_duration_seconds",
        "Time from a request's complete head to its complete response, as the "
        "worker saw it (the app's time included).",
        buckets=buckets, sum_value=durations["sum_seconds"])


class AdminHandler(http.server.BaseHTTPRequestHandler):
    server: AdminServer
    protocol_version = "HTTP/1.1"
    # A client that sends nothing does not hold a thread for long.
    timeout = 5

    def do_GET(self) -> None:   # noqa: N802 (http.server's naming)
        self.answer(*self.page(), with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802: load balancers' health checks, curl -I
        self.answer(*self.page(), with_body=False)

    def not_allowed(self) -> None:
        self.close_connection = True    # its body, unread, is no next request
        self.answer(*json_page(405, {"error": "only GET and HEAD"}),
                    extra=(("Allow", "GET, HEAD"), ("Connection", "close")))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = not_allowed  # noqa: N815

    def page(self) -> tuple[int, str, bytes]:
        """(status, content type, body) for this request's path; written by answer."""
        path = self.path.partition("?")[0]
        try:
            if path == "/metrics":
                encoder, content_type = metrics_encoder(self.headers.get("Accept", ""))
                return 200, content_type, encoder(self.server.registry)
            if path == "/healthz":
                return json_page(*health_of(self.server.snapshot()))
            if path == "/status":
                return json_page(200, self.server.snapshot())
            return json_page(404, {"error": "not found; try /metrics, /healthz, /status"})
        except Exception:   # an admin page must never take the primary down
            log.exception("admin endpoint: %s failed", path)
            return json_page(500, {"error": "internal error"})

    def answer(self, status: int, content_type: str, body: bytes, with_body: bool = True,
               extra: tuple = ()) -> None:
        server = self.server
        if server.answering(self.connection, True) > CONNECTION_SECONDS:
            # Open long enough: this answer is its last (a scraper that
            # keeps its connection opens another).
            self.close_connection = True
            extra = (*extra, ("Connection", "close"))
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            if with_body:
                self.wfile.write(body)
        except ConnectionError:
            self.close_connection = True    # the client left (a probe's timeout): nothing to say
        finally:
            server.answering(self.connection, False)

    def log_message(self, format: str, *args) -> None:
        pass    # scrapes every few seconds would drown the primary's log


def json_page(status: int, body: dict) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode() + b"\n"


def metrics_encoder(accept: str):
    """prometheus_client's choice for `accept`; its text format when it cannot parse it.

    choose_encoder raises on some malformed Accept headers (a bad `version=`):
    a scraper's typo is no reason for a 500.
    """
    try:
        return choose_encoder(accept)
    except Exception:
        return choose_encoder("")


# Each admin connection is a thread and a descriptor in the primary, beside
# its accept loop: a few at a time, none for long (a client trickling a byte
# every few seconds is never idle for AdminHandler.timeout).
MAX_CONNECTIONS = 16
CONNECTION_SECONDS = 10.0


class AdminServer(http.server.ThreadingHTTPServer):
    """The endpoint's HTTP server, on a socket bound like the main listener."""

    daemon_threads = True

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict]) -> None:
        # Bound by listener.bind for the same errors as the main address.
        sock = bind(host, port, backlog=64)
        sock.setblocking(True)
        super().__init__(sock.getsockname()[:2], AdminHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.snapshot = snapshot
        # Connection -> [when it opened, whether an answer is being written].
        self.opened: dict[socket.socket, list] = {}
        self.opened_lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PrimaryCollector(snapshot))
        self.thread = threading.Thread(target=self.serve_forever, name="admin",
                                       kwargs={"poll_interval": 0.5}, daemon=True)

    def process_request(self, request, client_address) -> None:
        with self.opened_lock:
            full = len(self.opened) >= MAX_CONNECTIONS
            if not full:
                self.opened[request] = [time.monotonic(), False]
        if full:
            # Closed at once, unanswered: an answer would need the request
            # read first (closed unread, the kernel resets the connection
            # and the answer with it), and so a thread.
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def answering(self, request, writing: bool) -> float:
        """Mark `request` as writing an answer (or done); how long it has been open."""
        with self.opened_lock:
            entry = self.opened.get(request)
            if entry is None:
                return 0.0
            entry[1] = writing
            return time.monotonic() - entry[0]

    def close_request(self, request) -> None:
        with self.opened_lock:
            self.opened.pop(request, None)
        super().close_request(request)

    def service_actions(self) -> None:
        """Between polls of the listener: end connections open too long."""
        now = time.monotonic()
        with self.opened_lock:
            # Not one writing its answer: it is cut short after it instead.
            old = [conn for conn, (since, writing) in self.opened.items()
                   if now - since > CONNECTION_SECONDS and not writing]
        for conn in old:
            try:
                conn.shutdown(socket.SHUT_RDWR)     # its thread's read returns
            except OSError:
                pass

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{format_address(host, port)}"

    def start(self) -> None:
        self.thread.start()
        log.info("Admin endpoint on %s (/metrics, /healthz, /status)", self.url)

    def close(self) -> None:
        if self.thread.is_alive():
            self.shutdown()
        self.server_close()
