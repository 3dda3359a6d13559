"""The primary's Python side: starts, pins, watches, replaces and stops workers.

The hot path (accepting connections and handing them to workers) runs in the
Cython Dispatcher.  It returns here when there is something for Python to do:
a signal arrived, a worker became ready or went away, accepting paused, or a
tick passed.  This module does that work and goes back into the loop.

As in gunicorn's arbiter, signal handlers only queue the signal; the loop
dispatches it to a handle_<name> method.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import time

from pyworker._dispatch import Dispatcher, Event
from pyworker.listener import bind, format_address
from pyworker.settings import Settings, available_cpus
from pyworker.worker import WorkerSpec

log = logging.getLogger("cydispatch.primary")

# Exit code of the primary when workers cannot start at all (as gunicorn's).
WORKER_BOOT_ERROR = 3
# Workers that die before reporting ready this many times in a row, in every
# slot, mean they cannot start: the primary gives up instead of looping.
MAX_BOOT_FAILURES = 3
# Respawns of a slot that keeps dying wait this long, doubling, up to the cap;
# a worker that lived STABLE_SECONDS resets the count.
RESPAWN_BACKOFF_FIRST = 0.1
RESPAWN_BACKOFF_CAP = 10.0
STABLE_SECONDS = 10.0
# The longest the primary sleeps between looks at its timers.
TICK_SECONDS = 1.0
LOAD_PAGE_SIZE = 4096
SIGNAL_QUEUE_LIMIT = 16


class WorkerSlot:
    """A place for one worker: its index (the dispatcher's slot) and its CPU."""

    __slots__ = ("index", "cpu", "pid", "ready", "started_at", "deaths",
                 "boot_failures", "start_at")

    def __init__(self, index: int, cpu: int | None) -> None:
        self.index = index
        self.cpu = cpu
        self.pid: int | None = None
        self.ready = False
        self.started_at = 0.0
        self.deaths = 0            # in a row, each within STABLE_SECONDS of its start
        self.boot_failures = 0     # in a row, each before the worker was ready
        self.start_at = 0.0        # when to start the next worker (backoff)


def describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class Arbiter:
    SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cpus = available_cpus()
        self.slots: list[WorkerSlot] = []
        self.pids: dict[int, WorkerSlot] = {}
        self.signal_queue: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.killed = False
        self.exit_code = 0
        self.listener: socket.socket | None = None
        self.dispatcher: Dispatcher | None = None
        self.address = ""

    # Setting up

    def open_listener(self) -> None:
        """Bind the address, or reserve it (reuseport), before any worker starts.

        Binding here first means a bad host or a port in use is reported once,
        clearly, by the primary; and `--port 0` resolves to one real port that
        every worker then uses.
        """
        settings = self.settings
        if settings.mode == "reuseport":
            # Bound but not listening: takes no connections, keeps the port
            # ours while workers come and go.
            self.listener = bind(settings.host, settings.port, settings.backlog,
                                 reuseport=True, listen=False)
        else:
            self.listener = bind(settings.host, settings.port, settings.backlog)
        port = self.listener.getsockname()[1]
        self.settings = settings.replace(port=port)
        self.address = "http://" + format_address(settings.host, port)

    def install_signals(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self.queue_signal)

    def queue_signal(self, signum: int, frame) -> None:
        # Nothing else here: the loop wakes on the wake-up fd and does the work.
        if len(self.signal_queue) < SIGNAL_QUEUE_LIMIT:
            self.signal_queue.append(signum)

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

    def cpu_for(self, index: int) -> int | None:
        """Slot i's CPU: cycle through the CPUs we were given."""
        if not self.settings.pin:
            return None
        return self.cpus[index % len(self.cpus)]

    # The loop

    def run(self) -> int:
        settings = self.settings
        self.open_listener()
        self.install_signals()
        listen_fd = self.listener.detach() if settings.mode == "dispatch" else -1
        self.dispatcher = Dispatcher(listen_fd, self.wake_r, settings.policy,
                                     settings.max_conns, settings.queue_depth)
        self.yield_to_workers()
        how = settings.mode
        if settings.mode == "dispatch":
            how += ", " + settings.policy
        log.info("Primary %d is running (%s, %d workers, %s)", os.getpid(), how,
                 settings.workers, self.address)
        for index in range(settings.workers):
            self.slots.append(WorkerSlot(index, self.cpu_for(index)))
        try:
            while not (self.stopping and not self.pids):
                self.start_due_workers()
                for event, arg in self.dispatcher.run(self.sleep_time()):
                    self.handle_event(event, arg)
                self.handle_signals()
                self.check_stop_deadline()
        finally:
            self.kill_all()
            signal.set_wakeup_fd(-1)
        log.info("Primary %d stopped", os.getpid())
        return self.exit_code

    def sleep_time(self) -> float:
        """Until the next timer: a delayed respawn or the stop deadline."""
        now = time.monotonic()
        due = [now + TICK_SECONDS]
        if self.stopping and not self.killed:
            due.append(self.stop_deadline)
        elif not self.stopping:
            due += [slot.start_at for slot in self.slots if slot.pid is None]
        return max(0.0, min(due) - now)

    def handle_event(self, event: int, arg: int) -> None:
        if event == Event.EVENT_READY:
            slot = self.slots[arg]
            slot.ready = True
            slot.boot_failures = 0
            where = f"on CPU {slot.cpu}" if slot.cpu is not None else "(not pinned)"
            log.info("Worker %d started %s", slot.pid, where)
        elif event == Event.EVENT_DRAINING:
            log.info("Worker %d is finishing its connections",
                     self.slots[arg].pid)
        elif event == Event.EVENT_CLOSED:
            log.debug("Worker %d closed its channel", self.slots[arg].pid)
        elif event == Event.EVENT_WORKER_FULL:
            log.warning("Worker %d is out of file descriptors; it gets no new "
                        "connections until some of its own close",
                        self.slots[arg].pid)
        elif event == Event.EVENT_ACCEPT_PAUSED:
            log.warning("Cannot accept connections (%s); pausing, they wait in the "
                        "backlog until descriptors free up", errno.errorcode[arg])
        elif event == Event.EVENT_ACCEPT_RESUMED:
            log.info("Accepting connections again")

    def handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.pop(0)
            name = signal.Signals(signum).name[3:].lower()
            getattr(self, "handle_" + name)()

    # Workers

    def start_due_workers(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid is None and slot.start_at <= now:
                self.spawn(slot)

    def spawn(self, slot: WorkerSlot) -> None:
        settings = self.settings
        primary_end, worker_end = socket.socketpair(socket.AF_UNIX,
                                                    socket.SOCK_SEQPACKET)
        load_fd = os.memfd_create(f"cydispatch-load-{slot.index}",
                                  os.MFD_CLOEXEC)
        try:
            os.ftruncate(load_fd, LOAD_PAGE_SIZE)
            listen_fd = self.listener.fileno() if settings.mode == "shared" else -1
            spec = WorkerSpec(settings, slot.index, slot.cpu,
                              worker_end.fileno(), load_fd, listen_fd)
            self.dispatcher.attach(slot.index, primary_end.detach(), load_fd)
            # Everything is close-on-exec; these few are for this child only.
            inherited = [worker_end.fileno(), load_fd]
            if listen_fd >= 0:
                inherited.append(listen_fd)
            for fd in inherited:
                os.set_inheritable(fd, True)
            try:
                pid = os.posix_spawn(
                    sys.executable,
                    [sys.executable, "-m", "pyworker.worker", spec.to_json()],
                    os.environ)
            except OSError:
                self.dispatcher.detach(slot.index)
                raise
            finally:
                for fd in inherited:
                    os.set_inheritable(fd, False)
        finally:
            worker_end.close()
            os.close(load_fd)
        slot.pid = pid
        slot.ready = False
        slot.started_at = time.monotonic()
        self.pids[pid] = slot

    def handle_chld(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # ECHILD: no children left to wait for
            if pid == 0:
                return
            slot = self.pids.pop(pid, None)
            if slot is not None:
                self.worker_exited(slot, status)

    def worker_exited(self, slot: WorkerSlot, status: int) -> None:
        pid = slot.pid
        slot.pid = None
        orphans = self.dispatcher.detach(slot.index)
        if self.stopping:
            log.info("Worker %d exited (%s)", pid, describe_exit(status))
        else:
            log.warning("Worker %d died (%s)", pid, describe_exit(status))
        if orphans:
            log.info("%d connections worker %d had not taken go to other workers",
                     orphans, pid)
        if self.stopping:
            return
        now = time.monotonic()
        if not slot.ready:
            slot.boot_failures += 1
        if now - slot.started_at < STABLE_SECONDS:
            slot.deaths += 1
        else:
            slot.deaths = 0
        if all(s.boot_failures >= MAX_BOOT_FAILURES for s in self.slots):
            log.error("Workers cannot start: each died before it was ready %d "
                      "times in a row; stopping", MAX_BOOT_FAILURES)
            self.exit_code = WORKER_BOOT_ERROR
            self.stop(graceful=False)
            return
        delay = 0.0
        if slot.deaths > 1:
            delay = min(RESPAWN_BACKOFF_FIRST * 2 ** (slot.deaths - 2),
                        RESPAWN_BACKOFF_CAP)
            log.warning("Worker slot %d keeps dying (%d times in a row); "
                        "next start in %.1f s", slot.index, slot.deaths, delay)
        slot.start_at = now + delay
        log.info("Starting a new worker")

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
            self.stop_deadline = time.monotonic() + self.settings.graceful_timeout
            # The listener closes first: what arrives from now on is refused by
            # the kernel, never accepted and then dropped.
            self.dispatcher.close_listener()
            if self.settings.mode != "dispatch":
                self.listener.close()
            if graceful:
                log.info("Stopping: finishing requests in progress (up to %g s)",
                         self.settings.graceful_timeout)
                for slot in self.slots:
                    if slot.pid is not None:
                        self.dispatcher.retire(slot.index)
                return
        if not graceful and not self.killed:
            log.info("Stopping now")
            self.kill_workers()

    def check_stop_deadline(self) -> None:
        if self.stopping and not self.killed and self.pids \
                and time.monotonic() >= self.stop_deadline:
            log.warning("Graceful timeout: killing %d workers", len(self.pids))
            self.kill_workers()

    def kill_workers(self) -> None:
        self.killed = True
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # ESRCH: it exited already; SIGCHLD will tell

    def kill_all(self) -> None:
        """Last resort on the way out: no worker outlives the primary."""
        for pid in list(self.pids):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # reaped already
            except ProcessLookupError:
                pass
        self.pids.clear()
