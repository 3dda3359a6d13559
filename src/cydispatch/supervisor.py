"""The primary's Python side: starts, pins, watches, replaces and stops workers.

The hot path (accepting connections and handing them to workers) runs in the
Cython Dispatcher.  It returns here when there is something for Python to do:
a signal arrived, a worker became ready, asked to be replaced or went away,
accepting paused, or a tick passed.  This module does that work and goes back
into the loop.

A *slot* is a place for one serving worker, with its CPU; which worker serves
in which slot, and when the next one starts, is kept by cydispatch.slots,
and this module acts on it.  Each live worker has a channel, numbered for the
dispatcher; channel numbers are reused once free.

Signals are counted from the wake-up fd, one byte per delivery (Python runs
a handler once for several deliveries of one signal: two SIGTTIN in a row
would add one worker); the loop dispatches each to a handle_<name> method.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time

from cydispatch._dispatch import DURATION_BOUNDS, Dispatcher, Event
from cydispatch.listener import ListenError, bind, format_address
from cydispatch.messages import MessageRouter
from cydispatch.settings import Settings, auto_queue_depths, available_cpus
from cydispatch.slots import (
    MAX_BOOT_FAILURES, RECYCLE_RETRY_SECONDS, WorkerProcess, WorkerSlot, WorkerSlots)
from cydispatch.spec import APP_LOAD_ERROR, WORKER_BOOT_ERROR, WorkerSpec
from cydispatch.systemd import Notifier, inherited_listener

log = logging.getLogger("cydispatch.primary")

# A worker the watchdog stops gets this long between SIGTERM and SIGKILL.
WATCHDOG_KILL_GRACE = 3.0
# A worker found silent past --timeout is stopped only if it is still silent
# this much later.  When the whole machine stalls (a virtual machine its host
# deschedules, a laptop that sleeps) every process resumes at once, and the
# primary may look before the workers have sent the heartbeats that fell due
# meanwhile: a worker whose loop turns sends one as soon as it runs.
WATCHDOG_CONFIRM = 0.5
# Before it is ready a worker is importing and binding, which on a loaded
# machine can take seconds: the watchdog allows at least this much.
BOOT_TIMEOUT = 10.0
# After --graceful-timeout, how long a stopping worker has to close its
# connections and run the app's lifespan shutdown before it is killed (at
# most the graceful timeout again: a short one stays short).
WORKER_EXIT_MARGIN = 2.0
# The longest the primary sleeps between looks at its timers.
TICK_SECONDS = 1.0
LOAD_PAGE_SIZE = 4096


def describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            # Real-time signals (SIGRTMIN+n) have no name in signal.Signals.
            return f"signal {-code}"
    return f"exit code {code}"


class Arbiter:
    SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
               signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cpus = available_cpus()
        self.slots = WorkerSlots(self.cpus if settings.pin else None)
        self.workers: dict[int, WorkerProcess] = {}     # by pid
        self.channels: dict[int, WorkerProcess] = {}    # by dispatcher number
        self.stopping = False
        self.stop_deadline = 0.0
        self.killed = False
        self.exit_code = 0
        self.served = False         # some worker has been ready
        self.listener: socket.socket | None = None
        self.dispatcher: Dispatcher | None = None
        self.address = ""
        self.started_at = time.monotonic()
        # Request durations (the histogram's buckets, and their sum) of
        # workers that have exited: with the live ones', a total that only grows.
        self.durations_done = [0] * len(DURATION_BOUNDS) + [0]
        self.duration_seconds_done = 0.0
        # Held by the admin thread while it reads the counts, and by the loop
        # while it folds an exited worker's in (fold_counts_and_detach).
        self.counts_lock = threading.Lock()
        self.admin = None   # the --admin endpoint's server, when asked for
        # Messages between workers (cydispatch.cluster), through the primary.
        self.router = MessageRouter()
        self.notifier = Notifier()
        self.announced_ready = False    # READY=1 sent since the start or a reload

    # Setting up

    def open_listener(self) -> None:
        """Bind the address, or reserve it (reuseport), before any worker starts.

        Binding here first means a bad host or a port in use is reported once,
        clearly, by the primary; and `--port 0` resolves to one real port that
        every worker then uses.
        """
        settings = self.settings
        scheme = "https://" if settings.ssl_certfile else "http://"
        inherited = inherited_listener()
        if inherited is not None:
            if settings.mode == "reuseport":
                raise ListenError("a socket from systemd (LISTEN_FDS) is served with "
                                  "--mode dispatch or shared, not reuseport")
            self.listener = inherited
            host, port = inherited.getsockname()[:2]
            self.address = scheme + format_address(host, port)
            self.settings = settings.replace(host=host, port=port)
            log.info("Serving the socket systemd passed (%s)", self.address)
            return
        if settings.mode == "reuseport":
            # Bound but not listening: takes no connections, keeps the port
            # ours while workers come and go.
            self.listener = bind(settings.host, settings.port, settings.backlog,
                                 reuseport=True, listen=False)
        else:
            self.listener = bind(settings.host, settings.port, settings.backlog)
        port = self.listener.getsockname()[1]
        self.settings = settings.replace(port=port)
        self.address = scheme + format_address(settings.host, port)

    def install_signals(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self.note_signal)

    def note_signal(self, signum: int, frame) -> None:
        """Nothing: the byte Python's C handler writes to the wake-up fd counts.

        A handler must be installed for that byte to be written (and for the
        default actions, such as stopping on SIGTTIN, not to happen).
        """

    def raise_descriptor_limit(self) -> None:
        """Soft RLIMIT_NOFILE up to the hard one, as HAProxy and nginx do.

        The primary holds a whole backlog while stopping and each worker a
        connection per client; the soft limit (often 1024) is a default for
        programs that never need more.  Workers inherit it.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (OSError, ValueError) as exc:
                log.warning("cannot raise the descriptor limit from %d to %d: %s",
                            soft, hard, exc)

    def yield_to_workers(self) -> None:
        """Run the primary as SCHED_BATCH: it does not preempt a busy worker.

        On a machine with every core busy, a primary that preempts a worker
        for each new connection hands connections out one at a time and
        takes the CPU from the workers that serve them; waiting for a core
        to free up (connections wait in the backlog meanwhile) hands them out
        in batches.  With a core idle it still runs at once.  Unprivileged;
        workers inherit it and go back to the normal policy as they start.
        """
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:
            log.debug("cannot use SCHED_BATCH for the primary: %s", exc)

    # The loop

    def run(self) -> int:
        settings = self.settings
        self.raise_descriptor_limit()
        self.open_listener()
        if settings.admin:
            # Imported only then: prometheus_client costs the primary memory.
            from cydispatch.admin import AdminServer, snapshot_of
            from cydispatch.listener import parse_admin_address
            # Before any worker: /healthz says 503 until one is ready.
            self.admin = AdminServer(*parse_admin_address(settings.admin),
                                     lambda: snapshot_of(self))
        self.install_signals()
        listen_fd = self.listener.detach() if settings.mode == "dispatch" else -1
        if settings.queue_depth:
            depth = slow_depth = settings.queue_depth
        else:
            depth, slow_depth = auto_queue_depths(settings.workers, len(self.cpus))
        self.dispatcher = Dispatcher(listen_fd, self.wake_r, settings.policy,
                                     settings.max_conns, depth, slow_depth)
        self.dispatcher.watch_python(self.router.fileno())
        self.yield_to_workers()
        how = settings.mode
        if settings.mode == "dispatch":
            how += f", {settings.policy}, queue depth {depth}"
            if slow_depth != depth:
                how += f" ({slow_depth} while some request is slow)"
        log.info("Primary %d is running (%s, %d workers, %s)", os.getpid(), how,
                 settings.workers, self.address)
        for _ in range(settings.workers):
            self.slots.add()
        if self.admin is not None:
            self.admin.start()
        try:
            while not (self.stopping and not self.workers):
                self.start_due_workers()
                self.start_next_replacement()
                for event, arg in self.dispatcher.run(self.sleep_time()):
                    self.handle_event(event, arg)
                self.watch_workers()
                self.check_stop_deadline()
                self.notifier.ping_if_due(time.monotonic())
        finally:
            self.kill_all()
            signal.set_wakeup_fd(-1)
            self.router.close_all()
            if self.admin is not None:
                self.admin.close()
        dispatcher = self.dispatcher
        if settings.mode == "dispatch":
            log.info("Primary %d stopped: %d connections accepted, %d taken back from "
                     "workers that did not take them, %d handed again, %d taken over by "
                     "a sibling before their worker reached them", os.getpid(), dispatcher.accepted,
                     dispatcher.reclaimed, dispatcher.redispatched, dispatcher.stolen)
        else:
            log.info("Primary %d stopped", os.getpid())
        return self.exit_code

    def sleep_time(self) -> float:
        """Until the next timer: a delayed start, a kill, the stop deadline, a
        systemd watchdog ping."""
        now = time.monotonic()
        due = [now + TICK_SECONDS]
        if self.stopping and not self.killed:
            due.append(self.stop_deadline)
        elif not self.stopping:
            due += self.slots.starts_after(now)
        due += [w.kill_at for w in self.workers.values() if w.kill_at]
        # Only while watch_workers may still judge it: once it is being
        # killed, a first-silent time left in the past would make the
        # primary spin.
        due += [w.silent_at + WATCHDOG_CONFIRM for w in self.workers.values()
                if w.silent_at and not (w.killed or w.kill_at)]
        if not self.stopping:
            # watch_workers acts on it only then; during a stop the stop's
            # own deadline kills what is left, and a past exit_by would
            # make the primary spin until it.
            due += [w.exit_by for w in self.workers.values() if w.exit_by]
        if self.notifier.ping_at is not None:
            due.append(self.notifier.ping_at)
        return max(0.0, min(due) - now)

    def handle_event(self, event: int, channel: int) -> None:
        if event == Event.EVENT_SIGNAL:
            self.handle_signal(channel)
            return
        if event in (Event.EVENT_ACCEPT_PAUSED, Event.EVENT_ACCEPT_RESUMED):
            self.handle_accept_event(event, channel)
            return
        if event == Event.EVENT_PYTHON_FD:
            self.router.pump()
            return
        worker = self.channels.get(channel)
        if worker is None:
            return  # already reaped
        if event == Event.EVENT_READY:
            self.worker_ready(worker)
        elif event == Event.EVENT_RECYCLE:
            if not self.stopping and self.slots.recycle(worker):
                log.info("Replacing worker %d: it reached --max-requests", worker.pid)
        elif event == Event.EVENT_DRAINING:
            self.worker_draining(worker)
        elif event == Event.EVENT_WORKER_FULL:
            lost = self.dispatcher.lost(channel)
            if lost:
                # Its descriptors went to something else than connections
                # (the app opened files): the kernel closed these on receipt.
                log.error("Worker %d ran out of file descriptors: %d connections "
                          "handed to it were closed", worker.pid, lost)
            else:
                log.warning("Worker %d is out of file descriptors; new "
                            "connections wait in the backlog until some of its "
                            "own close", worker.pid)

    def handle_accept_event(self, event: int, err: int) -> None:
        if event == Event.EVENT_ACCEPT_PAUSED:
            log.warning("Cannot accept connections (%s); pausing, they wait in the "
                        "backlog until descriptors free up", errno.errorcode[err])
        else:
            log.info("Accepting connections again")

    def handle_signal(self, signum: int) -> None:
        if signum not in self.SIGNALS:
            return
        name = signal.Signals(signum).name[3:].lower()
        getattr(self, "handle_" + name)()

    # Workers

    def start_due_workers(self) -> None:
        if self.stopping:
            return
        for slot in self.slots.due(time.monotonic()):
            worker = self.try_spawn(slot)
            if worker is not None:
                self.slots.started(slot, worker)

    def try_spawn(self, slot: WorkerSlot) -> WorkerProcess | None:
        """spawn(), or None after logging why not and setting when to try again.

        The primary may be out of descriptors, memory or processes for a
        while; the service it runs goes on with the workers it has.
        """
        try:
            return self.spawn(slot)
        except OSError as exc:
            delay = self.slots.spawn_failed(slot, time.monotonic())
            log.error("Cannot start a worker: %s; trying again in %.1f s",
                      exc.strerror or exc, delay)
            return None

    def worker_draining(self, worker: WorkerProcess) -> None:
        """A worker finishes up on its own (someone sent it SIGTERM): replace it now.

        It takes no new connections from here on; waiting for its exit to
        start a successor would leave its CPU unserved meanwhile.
        """
        if worker.retiring or self.stopping:
            return
        log.info("Worker %d is finishing its connections; starting its "
                 "successor", worker.pid)
        self.retire(worker)
        slot = worker.slot
        if worker is slot.successor:
            self.successor_died(slot)
        elif worker is slot.worker:
            self.slots.leaving(slot, time.monotonic())

    def free_channel(self) -> int:
        channel = 0
        while channel in self.channels:
            channel += 1
        return channel

    def spawn(self, slot: WorkerSlot) -> WorkerProcess:
        settings = self.settings
        channel = self.free_channel()
        primary_end, worker_end = socket.socketpair(socket.AF_UNIX,
                                                    socket.SOCK_SEQPACKET)
        load_fd = os.memfd_create(f"cydispatch-load-{slot.index}",
                                  os.MFD_CLOEXEC)
        worker_messages = None
        try:
            worker_messages = self.router.open(channel, slot.index)
            os.ftruncate(load_fd, LOAD_PAGE_SIZE)
            listen_fd = self.listener.fileno() if settings.mode == "shared" else -1
            spec = WorkerSpec(settings, slot.index, slot.cpu,
                              worker_end.fileno(), load_fd, listen_fd,
                              worker_messages.fileno())
            channel_fd = primary_end.detach()
            # The worker's end too: what the worker never receives is taken
            # back from it (see src/dispatch.pyx).
            peer_fd = os.dup(worker_end.fileno()) if settings.mode == "dispatch" else -1
            try:
                self.dispatcher.attach(channel, channel_fd, load_fd, peer_fd)
            except BaseException:
                os.close(channel_fd)    # not the dispatcher's yet
                if peer_fd >= 0:
                    os.close(peer_fd)
                raise
            # Everything is close-on-exec; these few are for this child only.
            inherited = [worker_end.fileno(), load_fd, worker_messages.fileno()]
            if listen_fd >= 0:
                inherited.append(listen_fd)
            for fd in inherited:
                os.set_inheritable(fd, True)
            try:
                pid = os.posix_spawn(
                    sys.executable,
                    [sys.executable, "-m", "pyworker.worker", spec.to_json()],
                    spec.environment(os.environ))
            except OSError:
                self.dispatcher.detach(channel)
                raise
            finally:
                for fd in inherited:
                    os.set_inheritable(fd, False)
        except BaseException:
            self.router.close(channel)  # no worker holds its other end
            raise
        finally:
            worker_end.close()
            if worker_messages is not None:
                worker_messages.close()
            os.close(load_fd)
        worker = WorkerProcess(pid, channel, slot)
        self.workers[pid] = worker
        self.channels[channel] = worker
        return worker

    def worker_ready(self, worker: WorkerProcess) -> None:
        worker.ready = True
        self.served = True
        slot = worker.slot
        where = f"on CPU {slot.cpu}" if slot.cpu is not None else "(not pinned)"
        log.info("Worker %d started %s", worker.pid, where)
        if worker is slot.worker:
            self.slots.worker_ready(slot)
            self.announce_if_ready()
        elif worker is slot.successor:
            old = self.slots.successor_ready(slot)
            if old is not None:
                log.info("Worker %d replaces worker %d, which finishes its "
                         "connections and exits", worker.pid, old.pid)
                self.retire(old)

    def announce_if_ready(self) -> None:
        """sd_notify READY=1 once every slot's worker serves (at start)."""
        if not self.announced_ready and not self.slots.reloading and not self.stopping \
                and self.slots.all_serving():
            self.announced_ready = True
            self.notifier.ready(f"Serving {self.address} with {len(self.slots)} workers")

    def retire(self, worker: WorkerProcess) -> None:
        """Hand `worker` nothing more and tell it to finish up and exit.

        It stops on its own at --graceful-timeout; one that is still there
        after the exit margin (stuck at exit: a thread that never ends, an
        atexit hook that hangs) is killed.
        """
        if not worker.retiring:
            worker.retiring = True
            graceful = self.settings.graceful_timeout
            worker.exit_by = time.monotonic() + graceful + min(WORKER_EXIT_MARGIN,
                                                               graceful)
            self.dispatcher.retire(worker.channel)

    def handle_chld(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # ECHILD: no children left to wait for
            if pid == 0:
                return
            with self.counts_lock:
                worker = self.workers.pop(pid, None)
                if worker is not None:
                    orphans = self.fold_counts_and_detach(worker)
            if worker is not None:
                self.worker_exited(worker, status, orphans)

    def fold_counts_and_detach(self, worker: WorkerProcess) -> int:
        """Keep an exited worker's counts, then let its page go; its orphans, how many.

        Under counts_lock with its removal from `workers`: a scrape sees the
        worker live or its counts folded in, never both or neither, so the
        totals it reports never go back.
        """
        counts, seconds = self.dispatcher.durations(worker.channel)
        self.slots.requests_done[worker.slot.index] += sum(counts)
        self.durations_done = [done + count for done, count in zip(self.durations_done, counts)]
        self.duration_seconds_done += seconds
        return self.dispatcher.detach(worker.channel)

    def worker_exited(self, worker: WorkerProcess, status: int, orphans: int) -> None:
        del self.channels[worker.channel]
        self.router.close(worker.channel)
        slot = worker.slot
        if self.stopping or worker.retiring:
            log.info("Worker %d exited (%s)", worker.pid, describe_exit(status))
        else:
            log.warning("Worker %d died (%s)", worker.pid, describe_exit(status))
        if orphans:
            log.info("%d connections worker %d had not taken go to other workers",
                     orphans, worker.pid)
        if self.stopping:
            return
        if not self.served and os.waitstatus_to_exitcode(status) == APP_LOAD_ERROR:
            # It will not load in the next worker either (its log says why).
            log.error("The application cannot be loaded; stopping")
            self.exit_code = APP_LOAD_ERROR
            self.stop(graceful=False)
            return
        if worker is slot.successor:
            self.successor_died(slot)
        elif worker is slot.worker:
            self.slots.count_restart(slot, "crash")
            self.slot_lost_worker(slot, worker)

    def slot_lost_worker(self, slot: WorkerSlot, worker: WorkerProcess) -> None:
        """The slot's worker died or hangs: count it, and start another in time."""
        if self.slots.vacate(slot):
            return  # its successor took over
        delay = self.slots.died(slot, worker, time.monotonic())
        if delay is None:
            log.error("Workers cannot start: each died before it was ready %d "
                      "times in a row; stopping", MAX_BOOT_FAILURES)
            self.exit_code = WORKER_BOOT_ERROR
            self.stop(graceful=False)
            return
        if delay:
            log.warning("Worker slot %d keeps dying (%d times in a row); "
                        "next start in %.1f s", slot.index, slot.deaths, delay)
        log.info("Starting a new worker")

    def successor_died(self, slot: WorkerSlot) -> None:
        """A replacement died before it was ready; the old worker still serves."""
        reloading = self.slots.reloading
        delay = self.slots.successor_failed(slot, time.monotonic())
        if delay is None:
            log.error("Replacement workers die before they are ready (%d times "
                      "in a row): replacing stops here, the running workers "
                      "keep serving", MAX_BOOT_FAILURES)
            if self.slots.replacements:
                log.warning("%d workers that reached --max-requests are to be "
                            "replaced again in %.0f s", len(self.slots.replacements),
                            RECYCLE_RETRY_SECONDS)
            if reloading:
                # A reload that systemd was told of ends here too: it waits for
                # READY=1 after RELOADING=1 (sd_notify(3)), else the unit stays
                # "reloading" and `systemctl reload` fails at its timeout.
                self.notifier.ready(f"Serving {self.address} with {len(self.slots)} "
                                    "workers (the reload failed: replacements died "
                                    "before they were ready)")
            return
        log.warning("A replacement for worker %d died before it was ready; "
                    "trying again in %.1f s", slot.worker.pid if slot.worker else 0,
                    delay)

    # Replacing workers: reload, --max-requests

    def start_next_replacement(self) -> None:
        """Start the successor of the first slot waiting for one, one at a time."""
        if self.stopping:
            return
        if self.slots.finish_reload():
            log.info("Reload complete: every worker replaced")
            self.notifier.ready(f"Serving {self.address} with {len(self.slots)} "
                                "workers (reloaded)")
            return
        slot = self.slots.next_to_replace(time.monotonic())
        if slot is not None:
            successor = self.try_spawn(slot)
            if successor is not None:
                self.slots.successor_started(slot, successor)

    def handle_hup(self) -> None:
        if self.stopping:
            return
        log.info("Reloading: replacing %d workers one at a time", len(self.slots))
        self.notifier.reloading()
        self.slots.reload()

    # Scaling

    def handle_ttin(self) -> None:
        if self.stopping:
            return
        self.slots.add()
        log.info("Adding a worker: %d now", len(self.slots))

    def handle_ttou(self) -> None:
        if self.stopping:
            return
        if len(self.slots) <= 1:
            log.warning("Not removing the last worker (SIGTERM stops the server)")
            return
        workers = self.slots.remove_last()
        log.info("Removing a worker: %d now", len(self.slots))
        for worker in workers:
            self.retire(worker)

    # The watchdog

    def watch_workers(self) -> None:
        """Kill workers whose loop stopped turning: no heartbeat for --timeout."""
        timeout = self.settings.timeout
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.killed:
                # The loop may turn again before SIGCHLD comes (a message
                # socket's hang-up wakes it first): judged once is enough.
                continue
            if worker.exit_by and now >= worker.exit_by and not self.stopping:
                log.warning("Worker %d did not exit within --graceful-timeout "
                            "%g s; killing it", worker.pid,
                            self.settings.graceful_timeout)
                self.signal_worker(worker, signal.SIGKILL)
                worker.exit_by = 0.0
            if worker.kill_at:
                if now >= worker.kill_at:
                    self.signal_worker(worker, signal.SIGKILL)
                    worker.kill_at = 0.0
                continue
            if not timeout or self.killed:
                continue
            limit = timeout if worker.ready else max(timeout, BOOT_TIMEOUT)
            silence = self.dispatcher.silence(worker.channel)
            if silence < limit:
                worker.silent_at = 0.0
                continue
            if not worker.silent_at:
                worker.silent_at = now
            if now < worker.silent_at + WATCHDOG_CONFIRM:
                continue
            log.warning("Worker %d has not answered for %.1f s (--timeout %g); "
                        "stopping it", worker.pid, silence, timeout)
            self.retire(worker)
            self.signal_worker(worker, signal.SIGTERM)
            worker.kill_at = now + WATCHDOG_KILL_GRACE
            slot = worker.slot
            if worker is slot.successor:
                self.successor_died(slot)
            elif worker is slot.worker and not self.stopping:
                # Its replacement need not wait for it to go.
                self.slots.count_restart(slot, "watchdog")
                self.slot_lost_worker(slot, worker)

    def signal_worker(self, worker: WorkerProcess, signum: int) -> None:
        if signum == signal.SIGKILL:
            worker.killed = True
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass  # ESRCH: it exited already; SIGCHLD will tell

    # Stopping

    def handle_term(self) -> None:
        self.stop(graceful=True)

    def handle_int(self) -> None:
        # The first Ctrl-C stops gracefully, a second one at once.
        self.stop(graceful=not self.stopping)

    def handle_quit(self) -> None:
        self.stop(graceful=False)

    def stop(self, graceful: bool) -> None:
        if not self.stopping:
            self.stopping = True
            self.slots.clear_replacements()
            # Workers stop on their own at --graceful-timeout (closing WebSockets
            # with 1001, running the app's shutdown); the kill is for those that
            # cannot.
            grace = self.settings.graceful_timeout
            self.stop_deadline = (time.monotonic() + grace
                                  + min(WORKER_EXIT_MARGIN, grace))
            # The listener closes first: what arrives from now on is refused by
            # the kernel, never accepted and then dropped.
            self.dispatcher.close_listener()
            if self.settings.mode != "dispatch":
                self.listener.close()
            self.notifier.stopping()
            if graceful and grace:
                log.info("Stopping: finishing requests in progress (up to %g s)",
                         self.settings.graceful_timeout)
                for worker in self.workers.values():
                    self.retire(worker)
                return
            graceful = False    # asked to stop now, or no time to finish in
        if not graceful and not self.killed:
            log.info("Stopping now")
            self.kill_workers()

    def check_stop_deadline(self) -> None:
        if self.stopping and not self.killed and self.workers \
                and time.monotonic() >= self.stop_deadline:
            log.warning("Graceful timeout: killing %d workers", len(self.workers))
            self.kill_workers()

    def kill_workers(self) -> None:
        self.killed = True
        for worker in self.workers.values():
            self.signal_worker(worker, signal.SIGKILL)

    def kill_all(self) -> None:
        """Last resort on the way out: no worker outlives the primary."""
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # reaped already
            except ProcessLookupError:
                pass
        self.workers.clear()
