"""A worker process: pinned to one CPU, serving HTTP on uvloop and httptools.

The primary starts it as `python -m pyworker.worker SPEC` (SPEC is JSON, see
WorkerSpec) with its end of the channel, its load page, its message socket
(cydispatch.cluster) and, in shared mode, the listening socket as inherited
fds.  In dispatch mode connections arrive over the channel; in the baseline
modes the worker accepts them itself.  The HTTP layer and the app are the
same in all three.

Once a tick it sends the primary a heartbeat over the channel (the watchdog
kills a worker that goes silent) and, past --max-requests, asks to be
replaced.  It exits when the primary says stop (a stop, a reload, its
replacement is ready), on SIGTERM, or when the channel ends (the primary
died): in each case it finishes the requests it holds first.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import importlib
import ipaddress
import logging
import os
import random
import resource
import select
import signal
import socket
import sys
import time
import warnings

import uvloop

from cydispatch import cluster, logs
from cydispatch._dispatch import HandedSocket, WorkerChannel, WorkerState, step_adoption
from cydispatch.listener import ListenError, bind, resolve
from cydispatch.spec import APP_LOAD_ERROR, WORKER_BOOT_ERROR, WorkerSpec
from pyworker.app import HelloApp
from pyworker.http import HttpProtocol, Responses
from pyworker.lifespan import Lifespan, LifespanFailed
from pyworker.loader import AppLoadError, load_app
from pyworker.tls import TlsError, server_context
from pyworker.messages import MessageLink
from pyworker.proxy import ProxyTrust

log = logging.getLogger("cydispatch.worker")

# How often the worker looks at its clocks and sends the primary a heartbeat.
TICK_SECONDS = 1.0
# The app's lifespan shutdown gets at least this long, even after a drain
# that used up the graceful timeout.
LIFESPAN_SHUTDOWN_MIN = 1.0
# Signals meant for the primary (reload, scaling) that may reach the whole
# process group; a worker must not stop or die of them.
PRIMARY_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
# Descriptors kept free for what the app opens itself (files, database
# connections), beyond those it holds when it reports ready.
FD_RESERVE = 64
# How long an exiting worker waits for room in the primary's socket to send
# its last report: the primary reads reports at every turn of its loop.
EXIT_FLUSH_SECONDS = 2.0
# How long an exiting worker waits for its WSGI threads to leave the app
# (those waiting on the loop give up within THREAD_WAIT_SLICE).
EXIT_THREAD_WAIT = 1.0


def flush_reports(channel: WorkerChannel, timeout: float) -> bool:
    """Send what waits on `channel`, waiting up to `timeout` s for room; True once sent.

    A channel already closed (the primary is gone) has nobody left to tell.
    """
    if channel.fileno() < 0:
        return True
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLOUT)
    while not channel.flush():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        poller.poll(left * 1000)
    return True


def load_direct_adoption(import_module=importlib.import_module):
    """pyworker.adoption's adopt_tcp, if it fits the uvloop installed; else None, said why.

    The module reaches into uvloop's private C layout, so it is used only
    with the uvloop it was compiled against.  When it is imported, Cython
    checks the size of each uvloop type it uses: a smaller one (or a missing
    one) is an exception, a larger one only a RuntimeWarning, made an error
    here.  Whatever goes wrong, the worker falls back to uvloop's public
    connect_accepted_socket: slower per connection, same behaviour.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            adoption = import_module("pyworker.adoption")
    except Exception as exc:    # RuntimeWarning included
        log.warning("Worker %d: handed connections take uvloop's slower public path: "
                    "pyworker.adoption cannot be used with uvloop %s (%s)",
                    os.getpid(), uvloop.__version__, exc)
        return None
    if adoption.BUILT_FOR_UVLOOP != uvloop.__version__:
        log.warning("Worker %d: handed connections take uvloop's slower public path: "
                    "cydispatch was built against uvloop %s, and uvloop %s is installed; "
                    "install uvloop %s, or rebuild cydispatch against this one "
                    "(pip install --no-build-isolation --force-reinstall cydispatch's source)",
                    os.getpid(), adoption.BUILT_FOR_UVLOOP, uvloop.__version__,
                    adoption.BUILT_FOR_UVLOOP)
        return None
    return adoption.adopt_tcp


def descriptor_room() -> int:
    """How many more connections this process has descriptors for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0    # unknown: no limit
    in_use = len(os.listdir("/proc/self/fd"))
    reserve = min(FD_RESERVE, soft // 8)
    return max(1, soft - in_use - reserve)


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.settings = spec.settings
        self.connections: set = set()
        # Dispatch mode counts a connection when its fd arrives (the channel
        # does it); the baseline modes when uvloop has accepted it.
        self.count_on_open = self.settings.mode != "dispatch"
        self.family, self.sockaddr = resolve(self.settings.host, self.settings.port)
        self.handed = HandedSocket(-1, self.family)
        self.draining = False
        # A stopping primary may still hand a draining worker the rest of
        # its backlog; the worker exits once it says nothing more follows.
        self.nothing_follows = False
        self.drain_deadline = 0.0
        # Counted by HttpProtocol; checked once a tick against the limit.
        self.requests = 0
        self.max_requests = 0
        if self.settings.max_requests:
            self.max_requests = self.settings.max_requests + random.randint(
                0, self.settings.max_requests_jitter)
        self.recycling = False
        self.started = False    # the app's lifespan startup is done
        self.quitting = False   # SIGQUIT
        # The app's lifespan shutdown, once the loop has stopped serving.
        self.shutdown: asyncio.Task | None = None
        self.loop_stop_asked = False    # see stop_loop
        self.report_retrying = False
        # The channel is read only while the worker has room in hand for
        # more connections (WorkerChannel.hand_full): its reader is removed
        # meanwhile, and a pull is due once it reaches one it holds.
        self.channel_watched = False
        self.pull_due = False
        self.steal_due = False
        self.ticks = 0
        self.now = time.monotonic()
        self.responses = Responses()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.channel: WorkerChannel | None = None
        self.server: asyncio.AbstractServer | None = None
        self.lifespan: Lifespan | None = None
        self.wsgi_app = None
        self.ssl_context = server_context(self.settings) if self.settings.ssl_certfile else None
        # Handed connections whose TLS handshake is under way (see open_tls).
        self.handshakes: set = set()
        # Before the app is imported: it may read cluster.worker_id, or
        # broadcast, as it loads.
        self.messages = MessageLink(spec.messages_fd)
        cluster._connect(spec.slot, self.messages.send)
        # Which peers may speak for a client (X-Forwarded-*, a PROXY
        # header): one judge, and one cache of its answers, for both.
        self.proxy_trust = ProxyTrust(self.settings)
        if self.settings.app:
            self.new_connection = self.serve_user_app()
        else:
            self.new_connection = self.serve_builtin_app()
        if self.settings.proxy_protocol:
            if self.ssl_context is None:
                self.new_connection = self.read_proxy_header_first(self.new_connection)

    def listening_address(self) -> tuple[str, int] | None:
        """(address, port) every connection arrives on, or None for a wildcard bind."""
        sockaddr = self.sockaddr
        if ipaddress.ip_address(sockaddr[0]).is_unspecified:
            return None
        return sockaddr[0], sockaddr[1]

    def serve_builtin_app(self):
        """A factory of protocols that serve the built-in app."""
        app = HelloApp()
        return functools.partial(HttpProtocol, self, app)

    def serve_user_app(self):
        """Load APP; a factory of protocols that serve it (raises AppLoadError)."""
        app, interface = load_app(self.settings)
        if interface == "wsgi":
            from pyworker.wsgi import WsgiApp
            app = self.wsgi_app = WsgiApp(app, self.settings)
        else:
            self.lifespan = Lifespan(app, self.settings.lifespan)
        from pyworker.asgi import AsgiConfig, AsgiProtocol
        state = self.lifespan.state if self.lifespan is not None else None
        # A WSGI app runs in threads: the loop is never blocked by it, and
        # busy means every thread is (WorkerChannel.hold_busy).
        config = AsgiConfig(app, self.settings, self.proxy_trust, state,
                            native=interface == "asgi", local=self.listening_address())
        log.debug("Worker %d serves %s (%s)", os.getpid(), self.settings.app, interface)
        return functools.partial(AsgiProtocol, self, config)

    def read_proxy_header_first(self, serve):
        """A factory of protocols that read a PROXY header, then hand over to `serve`'s.

        Chosen once, here: without --proxy-protocol nothing of it is on the
        path of a connection.
        """
        from pyworker.proxy_protocol import ProxyHeaderReader
        trust = self.proxy_trust
        return functools.partial(ProxyHeaderReader, self, serve, trust)

    def run(self) -> int:
        spec = self.spec
        # The primary runs as SCHED_BATCH (see Arbiter.yield_to_workers);
        # a worker serves requests and schedules like any other process.
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        if spec.cpu is not None:
            os.sched_setaffinity(0, {spec.cpu})
        self.channel = WorkerChannel(spec.channel_fd, spec.load_fd)
        # Called around every request's callbacks (HttpProtocol): bound once.
        self.begin = self.channel.begin
        self.end = self.channel.end
        self.stamped = self.channel.stamped
        self.observe = self.channel.observe
        self.observe_since_begin = self.channel.observe_since_begin
        if self.wsgi_app is not None:
            self.wsgi_app.watch_load(self.pool_full)
        os.close(spec.load_fd)   # mapped; the fd itself is not needed
        self.loop = loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        # Decided once: a plain connection pays for no TLS check.
        self.open_handed = loop.connect_accepted_socket
        # Decided once too: how a batch of handed connections is served.
        self.adopt = self.adopt_all
        self.adopt_tcp = None
        if self.settings.mode == "dispatch" and self.ssl_context is None:
            self.adopt_tcp = load_direct_adoption()
            if self.adopt_tcp is not None:
                self.adopt = self.adopt_directly
                log.debug("Worker %d opens handed connections as uvloop's own accept does "
                          "(uvloop %s)", os.getpid(), uvloop.__version__)
        # Connections adopted directly share one context, as those uvloop
        # accepts for a server do (each request's task has its own).
        self.adoption_context = contextvars.copy_context()
        if self.ssl_context is not None:
            self.open_handed = self.open_tls
            if self.settings.proxy_protocol:
                self.open_handed = self.open_proxied_tls
        # Ctrl-C reaches the whole process group; the primary leads the stop.
        for signum in PRIMARY_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGQUIT, self.quit)
        loop.add_reader(self.channel.fileno(), self.on_channel_readable)
        self.channel_watched = True
        if self.lifespan is not None:
            # Before ready: no connection reaches an app that has not started.
            try:
                loop.run_until_complete(self.lifespan.startup())
            except RuntimeError:
                if not (self.draining or self.quitting):
                    raise
                # The loop was stopped while the app started: SIGQUIT, or a
                # stop that outlasted --graceful-timeout.  Nothing to finish.
                log.info("Worker %d stopped before its app had started", os.getpid())
                self.close_channel()
                return 0
        self.started = True
        if self.draining:
            # A stop came while the app started (see exit_if_done): it ran to
            # its end so that its shutdown runs too; nothing is served.
            loop.call_soon(self.exit_if_done)
        else:
            self.start_serving()
        loop.call_later(TICK_SECONDS, self.tick)
        # What exists now lives as long as the worker: keep the collector from
        # walking it again and again (the objects of a request die young).
        gc.freeze()
        try:
            loop.run_forever()
            if self.lifespan is not None and self.draining and not self.quitting:
                self.shut_down_app()
        finally:
            if self.wsgi_app is not None:
                self.wsgi_app.stop()
            self.close_channel()
            self.messages.close()
        return 0

    def shut_down_app(self) -> None:
        """The app's lifespan shutdown, up to what is left of --graceful-timeout.

        Run on the loop that served, once it stopped.  What stopped it must
        not stop it again under the shutdown (see exit_if_done,
        graceful_timeout_expired): the callbacks of connections closed at
        the graceful timeout (WebSockets told 1001) run now, and a stopped
        run_until_complete would abandon the app's shutdown with a
        traceback.  SIGQUIT cuts it short (quit).
        """
        self.shutdown = self.loop.create_task(self.lifespan.shutdown(
            max(self.drain_deadline - time.monotonic(), LIFESPAN_SHUTDOWN_MIN)))
        try:
            self.loop.run_until_complete(self.shutdown)
        except asyncio.CancelledError:
            log.warning("Worker %d: SIGQUIT; the application's shutdown is cut short",
                        os.getpid())

    def close_channel(self) -> None:
        """The last report, then the channel closed: the primary hears this worker leave.

        With the channel closed already (the primary is gone), nothing is sent.
        """
        if not self.draining:
            # Leaving without a drain (SIGQUIT, or an error out of the
            # loop): said now, the primary starts a successor at once and
            # kills this process if it is still here after
            # --graceful-timeout (stuck at exit), --timeout or not.
            self.channel.report(WorkerState.WORKER_DRAINING)
        # A last report (connections lost for want of descriptors, the
        # state) must not be dropped because the primary's socket is full
        # for a moment.
        if not flush_reports(self.channel, EXIT_FLUSH_SECONDS):
            log.warning("Worker %d: the primary took no last report in %.0f s",
                        os.getpid(), EXIT_FLUSH_SECONDS)
        self.channel.close()

    def start_serving(self) -> None:
        loop = self.loop
        if self.settings.mode != "dispatch":
            self.server = loop.run_until_complete(loop.create_server(
                self.new_connection, sock=self.open_listener(),
                backlog=self.settings.backlog, ssl=self.ssl_context,
                ssl_handshake_timeout=self.handshake_timeout()))
        # What the app opened at startup is counted in; the primary hands
        # no more than this, since the kernel closes what does not fit.
        self.channel.set_fd_room(descriptor_room())
        # Messages reach the app's handlers once it has started.
        self.messages.start(loop)
        self.report(WorkerState.WORKER_READY)

    def open_listener(self) -> socket.socket:
        settings = self.settings
        if settings.mode == "shared":
            return socket.socket(fileno=self.spec.listen_fd)
        return bind(settings.host, settings.port, settings.backlog, reuseport=True)

    # The channel

    def on_channel_readable(self) -> None:
        self.pull_due = False
        channel = self.channel
        if channel.fileno() < 0:
            return      # the primary went away; a pull was still due
        fds, stop, final, closed = channel.receive(True)    # within the hand
        if fds:
            self.adopt(fds)
        if closed:
            log.warning("Worker %d: the primary is gone; finishing up", os.getpid())
            if self.channel_watched:
                self.loop.remove_reader(self.channel.fileno())
                self.channel_watched = False
            if self.report_retrying:
                # Nobody is left to report to; no watcher may outlive the fd.
                self.loop.remove_writer(self.channel.fileno())
                self.report_retrying = False
            self.channel.close()
            self.nothing_follows = True
            self.drain()
            return
        # Level-triggered: with the hand full, what waits would wake the
        # loop at every turn.  Leave it to the primary until there is room.
        if channel.hand_full == self.channel_watched:
            if self.channel_watched:
                self.loop.remove_reader(channel.fileno())
            else:
                self.loop.add_reader(channel.fileno(), self.on_channel_readable)
            self.channel_watched = not self.channel_watched
        if channel.backlogged:
            self.retry_report()
        if final:
            self.nothing_follows = True
        if stop or final:
            self.drain()
            self.exit_if_done()     # draining already when `final` comes alone

    def report(self, state: WorkerState) -> None:
        self.channel.report(state)
        self.retry_report()

    def retry_report(self) -> None:
        """A report the primary's socket had no room for goes when it has.

        Heartbeats included: a healthy worker must never look silent to the
        watchdog because one send found the socket full.
        """
        if self.channel.backlogged and not self.report_retrying:
            self.report_retrying = True
            self.loop.add_writer(self.channel.fileno(), self.on_channel_writable)

    def on_channel_writable(self) -> None:
        if self.channel.flush():
            self.report_retrying = False
            self.loop.remove_writer(self.channel.fileno())

    def adopt_all(self, fds: list[int]) -> None:
        """Serve handed connections through uvloop's public API.

        Plain ones go straight into uvloop instead (adopt_directly) wherever
        pyworker.adoption fits the uvloop installed.  Here, with TLS or
        without that module, uvloop's connect_accepted_socket is a coroutine that makes the
        transport at once and then waits for connection_made, which it has
        scheduled for the next turn of the loop (with TLS, for when the
        handshake is done: see open_tls).  It is stepped here by hand, not
        run as a task, and what reuseport's accept in C never pays is kept
        off the path: a task per connection, a callback on each one's
        future, a closure for its protocol factory (the protocol is its own:
        ConnectionProtocol, AsgiProtocol.__call__), an object for its fd (one
        HandedSocket, read only while the first step runs) and a Python frame
        per step (step_adoption is compiled, and catches no StopIteration).
        """
        handed = self.handed
        ticks = self.ticks
        new_connection = self.new_connection
        open_handed = self.open_handed
        failed = self.adopt_failed
        opening = []
        for fd in fds:
            protocol = new_connection(ticks)
            handed.fd = fd
            coroutine = open_handed(protocol, handed)
            waiter = step_adoption(coroutine, fd, protocol, failed)
            if waiter is not None:
                opening.append((coroutine, waiter, fd, protocol))
        if opening:
            # After the connection_made callbacks the first steps scheduled;
            # dropped while suspended, a coroutine would close its transport.
            self.loop.call_soon(self.adopted_all, opening)

    def adopt_directly(self, fds: list[int]) -> None:
        """Serve handed plain connections as uvloop serves those it accepts (pyworker.adoption)."""
        adopt_tcp = self.adopt_tcp
        loop = self.loop
        context = self.adoption_context
        new_connection = self.new_connection
        ticks = self.ticks
        for fd in fds:
            protocol = new_connection(ticks)
            try:
                adopt_tcp(loop, protocol, fd, context)
            except Exception as exc:
                self.adopt_failed(fd, protocol, exc)

    def adopted_all(self, opening: list) -> None:
        """The second steps of a batch's adoptions, once its connection_made callbacks have run."""
        failed = self.adopt_failed
        for coroutine, waiter, fd, protocol in opening:
            if waiter.done():   # always, without TLS: the second step ends it
                waiter = step_adoption(coroutine, fd, protocol, failed)
            if waiter is not None:
                self.resume(coroutine, waiter, fd, protocol)

    def resume(self, coroutine, waiter, fd: int, protocol) -> None:
        """Step an adoption on whenever what it waits for is done, to its end.

        A plain one has ended in adopted_all; one with TLS waits here for the
        handshake, behind --proxy-protocol for the header's bytes first.
        """
        while waiter is not None and waiter.done():
            waiter = step_adoption(coroutine, fd, protocol, self.adopt_failed)
        if waiter is not None:
            waiter.add_done_callback(lambda _: self.resume(coroutine, waiter, fd, protocol))

    def handshake_timeout(self) -> float | None:
        """A TLS handshake that has not ended by then is aborted; None without TLS."""
        if self.ssl_context is None:
            return None
        # The handshake and the request's head share --header-timeout: the
        # protocol's clock for the head starts when it is made, before the
        # handshake, so this is a backstop for a client that never finishes.
        return self.settings.header_timeout

    async def open_proxied_tls(self, protocol, handed: HandedSocket) -> None:
        """open_tls behind --proxy-protocol: the PROXY header first, off the socket.

        It precedes the TLS hello on the wire, so it is read before uvloop
        sees the fd (pyworker.proxy_protocol.read_header_off_socket), within
        --header-timeout; the handshake and the request's head then have
        theirs.  Meanwhile the connection stands with the handshakes: the
        tick takes it off the queue, a drain marks it.
        """
        from pyworker.proxy_protocol import (
            HandOnWithClient, ProxyHeaderError, read_header_off_socket)
        fd = handed.fd  # read now: `handed` serves the next fd once this suspends
        self.handshakes.add(protocol)
        try:
            header = await read_header_off_socket(
                self.loop, fd, self.proxy_trust,
                self.loop.time() + self.settings.header_timeout)
        except (ProxyHeaderError, OSError) as exc:     # TimeoutError included
            log.debug("closed a connection before TLS: %s", exc)
            header = None
        finally:
            self.handshakes.discard(protocol)
        if header is None:
            os.close(fd)    # uvloop never had it
            self.never_opened(protocol)
            return
        await self.open_tls(HandOnWithClient(protocol, header),
                            HandedSocket(fd, self.family), protocol)

    async def open_tls(self, protocol_factory, handed: HandedSocket,
                       protocol=None) -> None:
        """connect_accepted_socket with TLS, stepped by adopt_all() like the plain one.

        It suspends until the handshake ends, up to handshake_timeout().
        The channel counted the connection when it arrived, but a handshake
        that fails (plain HTTP, a rejected client certificate), times out or
        is abandoned never reaches the protocol: no connection_made, so no
        connection_lost to uncount it.  It is uncounted here; uvloop has
        closed its fd.
        """
        # `protocol`: the HTTP protocol, when the factory's is one that hands on to it.
        if protocol is None:
            protocol = protocol_factory()
        self.handshakes.add(protocol)
        try:
            await self.loop.connect_accepted_socket(
                protocol_factory, handed, ssl=self.ssl_context,
                ssl_handshake_timeout=self.handshake_timeout())
        except OSError as exc:  # ssl.SSLError, a reset, the timeout's ConnectionAbortedError
            log.debug("TLS handshake failed: %r", exc)
        except Exception as exc:
            # uvloop owns the fd from the first step on and has closed it:
            # adopt_failed's own close could hit a reused descriptor.
            log.warning("TLS handshake failed: %r", exc)
        finally:
            self.handshakes.discard(protocol)
        # Set by connection_made, which runs before this resumes; a
        # connection_lost that clears it comes a turn later.
        if protocol.transport is None:
            self.never_opened(protocol)

    def adopt_failed(self, fd: int, protocol, exc: Exception) -> None:
        if protocol.transport is None:
            # Never opened, so never closed: close and uncount it here.
            log.warning("could not serve a handed connection: %s", exc)
            os.close(fd)
            self.never_opened(protocol)

    def never_opened(self, protocol) -> None:
        """A handed connection that never reached connection_made: off the counts.

        No connection_lost will come for it to do this.
        """
        if protocol.queued_at is not None:
            self.dequeued(protocol)
        self.channel.closed()
        self.exit_if_done()

    # Connection accounting, called by HttpProtocol

    def connection_opened(self, protocol: HttpProtocol) -> None:
        self.connections.add(protocol)
        if self.count_on_open:
            self.channel.opened()

    def connection_closed(self, protocol: HttpProtocol) -> None:
        self.connections.discard(protocol)
        self.channel.closed()
        if self.draining:
            self.exit_if_done()

    def connection_handed_on(self, protocol) -> None:
        """`protocol` gave its connection to another, whose connection_made counts it again."""
        self.connections.discard(protocol)
        if self.count_on_open:
            self.channel.closed()

    def connection_replaced(self, old, new) -> None:
        """The connection now speaks another protocol (a WebSocket): still one connection."""
        self.connections.discard(old)
        self.connections.add(new)

    def dequeued(self, protocol) -> None:
        """The worker reached `protocol`'s request (or gave up on it): off its queue."""
        protocol.queued_at = None
        channel = self.channel
        channel.dequeue()
        if not self.channel_watched and not self.pull_due and channel.fileno() >= 0:
            # Room in hand: take the next from the channel, after the
            # callback that made room (a response being written) is done.
            self.pull_due = True
            self.loop.call_soon(self.on_channel_readable)
        self.look_at_siblings()

    def look_at_siblings(self) -> None:
        """Take what waits for a sibling, soon, if there is anything to take.

        What waits for a sibling stuck in a slow request would wait for all
        of it, and what waits for a busy one need not wait while this one
        sleeps: serve it here (WorkerChannel.steal).
        """
        if (not self.steal_due and not self.draining and self.channel.fileno() >= 0
                and self.channel.could_steal()):
            self.steal_due = True
            self.loop.call_soon(self.steal_from_siblings)

    def pool_full(self, full: bool) -> None:
        """Every thread of the WSGI pool is busy, or one is free again.

        Full, the worker reads as busy and takes nothing from its siblings
        (WorkerChannel.hold_busy).  Free again, it looks at once at what
        waits for them, as it does after each connection it reaches: the
        primary may see the free thread only a millisecond or two later.
        """
        self.channel.hold_busy(full)
        if not full:
            self.look_at_siblings()

    def steal_from_siblings(self) -> None:
        self.steal_due = False
        if self.draining or self.channel.fileno() < 0:
            return
        fds = self.channel.steal()
        if fds:
            self.adopt(fds)

    # Stopping

    def drain(self) -> None:
        """Take no new work, finish what is in progress, close idle connections."""
        if self.draining:
            return
        self.draining = True
        self.drain_deadline = time.monotonic() + self.settings.graceful_timeout
        # On time, not on the next tick: the primary's own deadline follows.
        self.loop.call_at(self.loop.time() + self.settings.graceful_timeout,
                          self.graceful_timeout_expired)
        self.report(WorkerState.WORKER_DRAINING)
        if self.server is not None:
            self.server.close()
        # A handshake still under way: its first request is its last.
        for protocol in (*self.connections, *self.handshakes):
            protocol.shutdown()
        self.exit_if_done()

    def exit_if_done(self) -> None:
        # Not while the app's lifespan startup or shutdown runs in
        # run_until_complete: stopping the loop there would abandon it.
        if self.draining and self.nothing_follows and self.started \
                and self.shutdown is None and self.channel.open_connections == 0:
            self.stop_loop()

    def stop_loop(self) -> None:
        """Stop serving: run_forever returns.  Asked once only.

        uvloop's stop() is a callback it schedules: asked twice in one turn
        (the graceful timeout closes the last connection, whose close ends
        the drain), the second can be left over for the next run, and stop
        the app's shutdown under it.
        """
        if not self.loop_stop_asked:
            self.loop_stop_asked = True
            self.loop.stop()

    def quit(self) -> None:
        """SIGQUIT: leave now, whatever is in progress."""
        self.quitting = True
        if self.shutdown is not None:
            self.shutdown.cancel()      # the app's shutdown: run_until_complete ends
        else:
            self.stop_loop()

    def tick(self) -> None:
        self.ticks += 1
        self.now = time.monotonic()
        self.responses.tick()
        # The watchdog's evidence that this loop turns (see --timeout).
        self.channel.heartbeat()
        self.retry_report()
        if self.max_requests and self.requests >= self.max_requests \
                and not self.recycling and not self.draining:
            # The primary starts a replacement and then stops this worker the
            # way a reload does; until then this worker serves as before.
            self.recycling = True
            log.info("Worker %d served %d requests; asking to be replaced",
                     os.getpid(), self.requests)
            self.report(WorkerState.WORKER_RECYCLE)
        # A handed connection still unanswered a whole tick later is waiting
        # for its client (its request is slow to come) or is a slow request
        # the primary already sees as one: it must not hold a place in the
        # queue the primary measures.
        # A TLS handshake that slow holds no place either.
        for protocol in (*self.connections, *self.handshakes):
            if protocol.queued_at is not None and protocol.queued_at < self.ticks - 1:
                self.dequeued(protocol)
        # The clock has a resolution of one tick: allow one more so that no
        # connection is closed before it has been idle for the full timeout.
        idle_cutoff = self.now - self.settings.keepalive_timeout - TICK_SECONDS
        head_cutoff = self.now - self.settings.header_timeout - TICK_SECONDS
        send_cutoff = self.now - self.settings.send_timeout - TICK_SECONDS
        for protocol in list(self.connections):
            protocol.check_timeouts(self.now, idle_cutoff, head_cutoff, send_cutoff)
        self.loop.call_later(TICK_SECONDS, self.tick)

    def graceful_timeout_expired(self) -> None:
        if not self.loop.is_running() or self.shutdown is not None:
            return      # the loop already stopped serving
        log.warning("Worker %d: graceful timeout; closing %d connections",
                    os.getpid(), len(self.connections))
        for protocol in list(self.connections):
            going_away = getattr(protocol, "going_away", None)
            if going_away is not None:
                going_away()    # WebSockets: a close frame with 1001
        self.stop_loop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = WorkerSpec.from_json(argv[0])
    logs.configure(spec.settings.log_level)
    try:
        worker = Worker(spec)
        code = worker.run()
    except AppLoadError as exc:
        log.error("Worker %d cannot load the application: %s", os.getpid(), exc,
                  exc_info=exc.__cause__ if exc.user_code else None)
        return APP_LOAD_ERROR
    except (LifespanFailed, ListenError, TlsError) as exc:
        log.error("Worker %d cannot start: %s", os.getpid(), exc)
        return WORKER_BOOT_ERROR
    except Exception:
        log.exception("Worker %d cannot start", os.getpid())
        return WORKER_BOOT_ERROR
    stuck = (worker.wsgi_app.threads_left_in_app(EXIT_THREAD_WAIT)
             if worker.wsgi_app is not None else 0)
    if stuck:
        # Python would wait for them at exit, for as long as the app takes:
        # forever for a request stuck there, with no primary left to kill
        # this process.  Leave now; what they serve is cut off either way.
        log.warning("Worker %d leaves %d WSGI threads inside the application",
                    os.getpid(), stuck)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
