"""The primary's slots: which worker serves where, and when the next one starts.

A *slot* is a place for one serving worker, with its CPU.  During a reload a
slot briefly has two workers: the one serving and its successor, which takes
over once it is ready.  WorkerSlots keeps that record (workers and successors,
restarts, deaths in a row and the backoff they earn, the queue of slots whose
worker is to be replaced); the supervisor starts, signals and reaps the
processes and tells it what happened.  Nothing here touches a process, so a
test can drive it with the clock it passes in.
"""

from __future__ import annotations

import collections
import time
from typing import Iterator

# Workers that die before reporting ready this many times in a row, in every
# slot, mean they cannot start: the primary gives up instead of looping.
MAX_BOOT_FAILURES = 3
# Respawns of a slot that keeps dying wait this long, doubling, up to the cap;
# a worker that lived STABLE_SECONDS resets the count.
RESPAWN_BACKOFF_FIRST = 0.1
RESPAWN_BACKOFF_CAP = 10.0
STABLE_SECONDS = 10.0
# When replacing stops (successors that die before ready), what --max-requests
# asked for is still wanted: tried again this much later.
RECYCLE_RETRY_SECONDS = 60.0


class WorkerProcess:
    """One live worker process and what the primary knows of it."""

    __slots__ = ("pid", "channel", "slot", "ready", "started_at", "retiring",
                 "kill_at", "exit_by", "killed", "silent_at")

    def __init__(self, pid: int, channel: int, slot: WorkerSlot) -> None:
        self.pid = pid
        self.channel = channel      # its number in the dispatcher
        self.slot = slot
        self.ready = False
        self.started_at = time.monotonic()
        self.retiring = False       # told to finish and exit; replaced already
        self.kill_at = 0.0          # watchdog: SIGKILL then, if still alive
        self.exit_by = 0.0          # retiring: SIGKILL then, if still alive
        self.killed = False         # SIGKILL sent: only its exit is left to see
        self.silent_at = 0.0        # watchdog: first seen silent past --timeout


class WorkerSlot:
    """A place for one serving worker: its CPU, its worker, its restart history."""

    __slots__ = ("index", "cpu", "worker", "successor", "deaths",
                 "boot_failures", "successor_failures", "start_at", "restarts",
                 "replace_reason", "replace_again", "recycle_wanted")

    def __init__(self, index: int, cpu: int | None) -> None:
        self.index = index
        self.cpu = cpu
        self.worker: WorkerProcess | None = None      # serving, or starting
        self.successor: WorkerProcess | None = None   # its replacement, starting
        self.deaths = 0             # in a row, each within STABLE_SECONDS of its start
        self.boot_failures = 0      # in a row, each before the worker was ready
        self.successor_failures = 0  # replacements that died before ready
        self.start_at = 0.0         # when to start the next worker (backoff)
        self.restarts = 0           # workers that replaced another here
        self.replace_reason = "reload"  # why its worker is being replaced
        # A reload came while its successor was already starting: that one
        # may have loaded the code from before, so it is replaced in turn.
        self.replace_again = False
        self.recycle_wanted = False     # its worker reached --max-requests


def backoff(failures: int) -> float:
    """The wait before the next start after `failures` quick deaths in a row."""
    if failures <= 1:
        return 0.0
    return min(RESPAWN_BACKOFF_FIRST * 2 ** (failures - 2), RESPAWN_BACKOFF_CAP)


class WorkerSlots:
    """The slots in order, what serves in each, and the replacements to come.

    Iterating, len() and `in` see the slots.  The admin thread reads them
    (list(), one step under the GIL) while the loop changes them.
    """

    def __init__(self, cpus: list[int] | None) -> None:
        self.cpus = cpus            # slot i runs on cpus[i % len]; None: not pinned
        self._slots: list[WorkerSlot] = []
        # Slots whose worker is to be replaced, one at a time (reload,
        # --max-requests), oldest request first.
        self.replacements: list[WorkerSlot] = []
        self.reloading = False
        # Workers replaced, by why (crash, watchdog, recycle, reload): for --admin.
        self.restarts: collections.Counter[str] = collections.Counter()
        # Requests answered by exited workers, by slot index: kept by index,
        # not by slot, since a slot removed (TTOU) and one added again
        # (TTIN) share an index, its label in the metrics.
        self.requests_done: collections.Counter[int] = collections.Counter()

    def __iter__(self) -> Iterator[WorkerSlot]:
        # The list's own iterator, not a generator: list() drains it in C,
        # without a thread switch in between.
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, slot: object) -> bool:
        return slot in self._slots

    # Scaling

    def add(self) -> WorkerSlot:
        """A new slot at the end, empty: its worker is due at once."""
        index = len(self._slots)
        slot = WorkerSlot(index, self.cpu_for(index))
        self._slots.append(slot)
        return slot

    def cpu_for(self, index: int) -> int | None:
        """Slot i's CPU: cycle through the CPUs we were given."""
        if self.cpus is None:
            return None
        return self.cpus[index % len(self.cpus)]

    def remove_last(self) -> list[WorkerProcess]:
        """Drop the newest slot; its workers, successor first, are the caller's to retire."""
        slot = self._slots.pop()
        if slot in self.replacements:
            self.replacements.remove(slot)
        workers = [worker for worker in (slot.successor, slot.worker) if worker is not None]
        slot.worker = slot.successor = None
        return workers

    # Starting workers

    def due(self, now: float) -> list[WorkerSlot]:
        """The slots without a worker whose next start has come."""
        return [slot for slot in self._slots
                if slot.worker is None and slot.start_at <= now]

    def started(self, slot: WorkerSlot, worker: WorkerProcess) -> None:
        slot.worker = worker
        slot.recycle_wanted = False     # a new worker: whoever asked is gone
        if slot in self.replacements:
            self.replacements.remove(slot)  # a new worker already

    def spawn_failed(self, slot: WorkerSlot, now: float) -> float:
        """A start failed (the primary is short of something): the wait before the next try."""
        slot.deaths += 1
        delay = max(backoff(slot.deaths), RESPAWN_BACKOFF_FIRST)
        slot.start_at = now + delay
        return delay

    def starts_after(self, now: float) -> list[float]:
        """The times of starts still to come: slots waiting for a worker, the next replacement."""
        # Starts that are due happened before this: only later ones count.
        due = [slot.start_at for slot in self._slots
               if slot.worker is None and slot.start_at > now]
        if self.replacements and self.replacements[0].start_at > now:
            due.append(self.replacements[0].start_at)
        return due

    def worker_ready(self, slot: WorkerSlot) -> None:
        """Its worker reports ready: it did boot."""
        slot.boot_failures = 0

    def successor_ready(self, slot: WorkerSlot) -> WorkerProcess | None:
        """Its successor reports ready and takes the slot: the worker it replaced, if any."""
        # The new worker serves; the old one finishes what it holds.
        old = slot.worker
        self.promote_successor(slot)
        slot.successor_failures = 0
        if old is not None:
            self.count_restart(slot, slot.replace_reason)
        return old

    def all_serving(self) -> bool:
        return all(slot.worker is not None and slot.worker.ready for slot in self._slots)

    def count_restart(self, slot: WorkerSlot, reason: str) -> None:
        self.restarts[reason] += 1
        slot.restarts += 1

    # Losing workers

    def promote_successor(self, slot: WorkerSlot) -> None:
        slot.worker, slot.successor = slot.successor, None
        slot.recycle_wanted = False
        if slot in self.replacements:
            self.replacements.remove(slot)
        if slot.replace_again:
            slot.replace_again = False
            self.replacements.append(slot)

    def vacate(self, slot: WorkerSlot) -> bool:
        """The slot's worker is gone or going; True if a successor took its place."""
        slot.worker = None
        if slot.successor is None:
            return False
        # Its replacement was starting anyway: it takes the slot.
        self.promote_successor(slot)
        return True

    def leaving(self, slot: WorkerSlot, now: float) -> None:
        """Its worker finishes up on its own: the successor serves, or the next starts now.

        No death is counted and no backoff applies: it did not fail.
        """
        if not self.vacate(slot):
            slot.start_at = now

    def died(self, slot: WorkerSlot, worker: WorkerProcess, now: float) -> float | None:
        """`worker` served `slot` and died or hangs: the wait before the next start.

        Called once vacate() found no successor to take over.  None when no
        worker can start: in every slot, MAX_BOOT_FAILURES in a row died before
        they were ready.
        """
        if not worker.ready:
            slot.boot_failures += 1
        if now - worker.started_at < STABLE_SECONDS:
            slot.deaths += 1
        else:
            slot.deaths = 0
        if all(s.boot_failures >= MAX_BOOT_FAILURES for s in self._slots):
            return None
        delay = backoff(slot.deaths)
        slot.start_at = now + delay
        return delay

    # Replacing workers: reload, --max-requests

    def reload(self) -> None:
        """Queue every slot for a new worker."""
        self.reloading = True
        for slot in self._slots:
            slot.successor_failures = 0
            if slot.worker is not None:
                # A replacement retried later (backoff, a recycle after a
                # failed reload) starts now: the operator asks afresh.  An
                # empty slot keeps its respawn's backoff.
                slot.start_at = 0.0
            slot.replace_reason = "reload"
            if slot.successor is not None:
                slot.replace_again = True
            if slot not in self.replacements:
                self.replacements.append(slot)

    def recycle(self, worker: WorkerProcess) -> bool:
        """`worker` reached --max-requests: queue its slot, unless it is queued or gone already."""
        slot = worker.slot
        if worker is not slot.worker or slot in self.replacements or slot not in self._slots:
            return False
        slot.replace_reason = "recycle"
        slot.recycle_wanted = True
        self.replacements.append(slot)
        return True

    def successor_starting(self) -> bool:
        return any(slot.successor is not None for slot in self._slots)

    def finish_reload(self) -> bool:
        """True once, when a reload has replaced every worker."""
        if self.reloading and not self.replacements and not self.successor_starting():
            self.reloading = False
            return True
        return False

    def next_to_replace(self, now: float) -> WorkerSlot | None:
        """The slot whose successor is to start now: one at a time, first queued first."""
        if not self.replacements or self.successor_starting():
            return None
        slot = self.replacements[0]
        if slot.worker is None or not slot.worker.ready:
            return None  # a new worker is starting there anyway
        if slot.start_at > now:
            return None
        return slot

    def successor_started(self, slot: WorkerSlot, worker: WorkerProcess) -> None:
        slot.successor = worker

    def successor_failed(self, slot: WorkerSlot, now: float) -> float | None:
        """Its successor died (or hangs) before it was ready: the wait before the next try.

        None when MAX_BOOT_FAILURES in a row end replacing: a reload is over
        (the operator sees why, and reloads again), the running workers keep
        serving.  Only what --max-requests asked for stays queued, to be
        tried again after RECYCLE_RETRY_SECONDS: the worker asks only once,
        and what made successors die may pass (a database down at startup).
        """
        slot.successor = None
        slot.replace_again = False      # the next one starts from the code of now
        slot.successor_failures += 1
        if slot.successor_failures >= MAX_BOOT_FAILURES:
            slot.successor_failures = 0
            self.replacements[:] = [s for s in self.replacements if s.recycle_wanted]
            for kept in self.replacements:
                kept.replace_reason = "recycle"
                kept.start_at = max(kept.start_at, now + RECYCLE_RETRY_SECONDS)
            self.reloading = False
            return None
        delay = backoff(slot.successor_failures + 1)
        slot.start_at = now + delay
        return delay

    def clear_replacements(self) -> None:
        """Nothing more is replaced: the server is stopping."""
        self.replacements.clear()
        for slot in self._slots:
            slot.replace_again = slot.recycle_wanted = False
