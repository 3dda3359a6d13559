"""The supervisor's slot bookkeeping (cydispatch.slots), driven without processes.

WorkerSlots only records what the supervisor tells it, with the clock passed
in, so the sequences that are slow or racy to provoke with real workers
(deaths in a row, a reload's order, a successor that keeps dying) are
played here step by step.  The real processes are in test_resilience.py.
"""

import pytest

from cydispatch.slots import (
    MAX_BOOT_FAILURES, RECYCLE_RETRY_SECONDS, RESPAWN_BACKOFF_CAP, RESPAWN_BACKOFF_FIRST,
    STABLE_SECONDS,
    WorkerProcess, WorkerSlots)

T0 = 1000.0     # a monotonic time; only differences count


def worker_for(slot, pid, started_at=T0):
    worker = WorkerProcess(pid, pid, slot)
    worker.started_at = started_at
    return worker


def serving(slots, slot, pid, started_at=T0):
    """Start a worker in `slot` and let it report ready, as the supervisor does."""
    worker = worker_for(slot, pid, started_at)
    slots.started(slot, worker)
    worker.ready = True
    slots.worker_ready(slot)
    return worker


def successor_serving(slots, slot, pid, now):
    """Start `slot`'s successor and let it take over: the worker it replaced."""
    assert slots.next_to_replace(now) is slot
    successor = worker_for(slot, pid, now)
    slots.successor_started(slot, successor)
    successor.ready = True
    return slots.successor_ready(slot)


def test_slots_cycle_through_the_cpus_they_were_given():
    pinned = WorkerSlots([2, 5])
    assert [pinned.add().cpu for _ in range(5)] == [2, 5, 2, 5, 2]
    unpinned = WorkerSlots(None)
    assert [unpinned.add().cpu for _ in range(2)] == [None, None]
    assert [slot.index for slot in pinned] == [0, 1, 2, 3, 4]


def test_quick_deaths_in_a_row_back_off_doubling_up_to_the_cap():
    slots = WorkerSlots(None)
    slot = slots.add()
    now = T0
    delays = []
    for pid in range(100, 112):
        worker = serving(slots, slot, pid, started_at=now)
        now += 1.0      # dies a second after its start: well within STABLE_SECONDS
        assert not slots.vacate(slot)
        delay = slots.died(slot, worker, now)
        assert slot.start_at == pytest.approx(now + delay)
        assert slots.due(now) == ([slot] if delay == 0 else [])
        assert slots.due(now + delay) == [slot]
        delays.append(delay)
        now += delay
    assert delays[:5] == pytest.approx([0.0, RESPAWN_BACKOFF_FIRST, 2 * RESPAWN_BACKOFF_FIRST,
                                        4 * RESPAWN_BACKOFF_FIRST, 8 * RESPAWN_BACKOFF_FIRST])
    assert delays[-1] == RESPAWN_BACKOFF_CAP
    assert slot.deaths == 12
    # Ready workers each time: the boot failures never add up to giving up.
    assert slot.boot_failures == 0


def test_a_worker_that_lived_long_enough_resets_the_deaths_in_a_row():
    slots = WorkerSlots(None)
    slot = slots.add()
    now = T0
    for pid in (100, 101, 102):
        worker = serving(slots, slot, pid, started_at=now)
        slots.vacate(slot)
        slots.died(slot, worker, now + 1.0)
        now = slot.start_at
    assert slot.deaths == 3
    worker = serving(slots, slot, 103, started_at=now)
    slots.vacate(slot)
    assert slots.died(slot, worker, now + STABLE_SECONDS) == 0.0
    assert slot.deaths == 0
    assert slot.start_at == now + STABLE_SECONDS


def test_workers_that_never_become_ready_in_every_slot_mean_none_can_start():
    slots = WorkerSlots(None)
    first, second = slots.add(), slots.add()
    for attempt in range(MAX_BOOT_FAILURES):
        for slot in (first, second):
            worker = worker_for(slot, 100 + attempt * 2 + slot.index)
            slots.started(slot, worker)
            slots.vacate(slot)
            delay = slots.died(slot, worker, T0 + attempt)
            last = attempt == MAX_BOOT_FAILURES - 1 and slot is second
            assert (delay is None) == last
    assert first.boot_failures == second.boot_failures == MAX_BOOT_FAILURES


def test_one_slot_that_boots_keeps_the_server_trying():
    slots = WorkerSlots(None)
    failing, booting = slots.add(), slots.add()
    serving(slots, booting, 200)
    for attempt in range(MAX_BOOT_FAILURES + 2):
        worker = worker_for(failing, 100 + attempt)
        slots.started(failing, worker)
        slots.vacate(failing)
        assert slots.died(failing, worker, T0 + attempt) is not None
    assert failing.boot_failures == MAX_BOOT_FAILURES + 2


def test_a_worker_that_became_ready_resets_its_slots_boot_failures():
    slots = WorkerSlots(None)
    slot = slots.add()

    def dies_booting(pid):
        worker = worker_for(slot, pid)
        slots.started(slot, worker)
        slots.vacate(slot)
        return slots.died(slot, worker, T0 + 1.0)

    assert dies_booting(100) is not None
    assert dies_booting(101) is not None
    booted = serving(slots, slot, 102)
    slots.vacate(slot)
    slots.died(slot, booted, T0 + 1.0)
    assert dies_booting(103) is not None
    assert dies_booting(104) is not None
    assert dies_booting(105) is None, "the third in a row since one was ready"


def test_a_failed_spawn_waits_at_least_the_first_backoff():
    slots = WorkerSlots(None)
    slot = slots.add()
    assert slots.due(T0) == [slot]
    assert slots.spawn_failed(slot, T0) == RESPAWN_BACKOFF_FIRST
    assert slots.due(T0) == []
    assert slots.starts_after(T0) == [T0 + RESPAWN_BACKOFF_FIRST]
    assert slots.due(T0 + RESPAWN_BACKOFF_FIRST) == [slot]


def test_a_reload_replaces_one_slot_at_a_time_a_recycle_queued_before_it_first():
    slots = WorkerSlots(None)
    workers = [serving(slots, slots.add(), 100 + index) for index in range(3)]
    first, second, third = list(slots)
    assert slots.recycle(workers[2])
    assert not slots.recycle(workers[2]), "queued once"
    slots.reload()
    assert slots.replacements == [third, first, second]
    # The reload's reason wins over the recycle's for the slot queued twice.
    assert [slot.replace_reason for slot in slots] == ["reload"] * 3
    order = []
    now = T0
    while not slots.finish_reload():
        slot = slots.next_to_replace(now)
        successor = worker_for(slot, 200 + slot.index, now)
        slots.successor_started(slot, successor)
        assert slots.next_to_replace(now) is None, "one successor at a time"
        assert not slots.finish_reload(), "not over while a successor starts"
        old = slots.successor_ready(slot)
        assert old is workers[slot.index]
        assert slot.worker is successor and slot.successor is None
        order.append(slot.index)
        now += 1.0
    assert order == [2, 0, 1]
    assert not slots.reloading
    assert not slots.finish_reload(), "over once"
    assert slots.restarts["reload"] == 3
    assert slots.restarts["recycle"] == 0
    assert [slot.restarts for slot in slots] == [1, 1, 1]



def test_a_reload_during_a_reload_replaces_a_successor_that_was_already_starting():
    # That successor may have imported the code from before the second
    # deploy: once it serves, its slot is queued again.
    slots = WorkerSlots(None)
    [serving(slots, slots.add(), 100 + index) for index in range(2)]
    first, second = list(slots)
    slots.reload()
    early = worker_for(first, 200, T0)
    slots.successor_started(first, early)
    slots.reload()                          # while `early` starts
    assert slots.replacements == [first, second]
    early.ready = True
    slots.successor_ready(first)
    assert slots.replacements == [second, first], "replaced again, after the others"
    now = T0 + 1
    replaced = []
    while not slots.finish_reload():
        replaced.append(slots.next_to_replace(now).index)
        successor_serving(slots, slots.next_to_replace(now), 300 + len(replaced), now)
        now += 1
    assert replaced == [1, 0]
    assert first.worker.pid == 302 and second.worker.pid == 301


def test_a_recycled_slot_counts_its_restart_as_a_recycle():
    slots = WorkerSlots(None)
    slot = slots.add()
    old = serving(slots, slot, 100)
    assert slots.recycle(old)
    assert successor_serving(slots, slot, 101, T0) is old
    assert slots.restarts == {"recycle": 1}
    assert slots.replacements == []
    assert not slots.reloading


def test_only_the_serving_worker_of_a_present_slot_is_recycled():
    slots = WorkerSlots(None)
    slot, last = slots.add(), slots.add()
    worker = serving(slots, slot, 100)
    gone = serving(slots, last, 101)
    slots.successor_started(slot, worker_for(slot, 102))
    assert not slots.recycle(slot.successor)
    assert slots.remove_last() == [gone]
    assert not slots.recycle(gone)
    assert slots.replacements == []


def test_no_replacement_starts_before_the_slot_serves():
    slots = WorkerSlots(None)
    slot = slots.add()
    booting = worker_for(slot, 100)
    slots.started(slot, booting)
    slots.reload()
    assert slots.next_to_replace(T0) is None    # a new worker is starting there anyway
    booting.ready = True
    slots.worker_ready(slot)
    assert slots.next_to_replace(T0) is slot


def test_a_successor_takes_over_the_slot_when_its_worker_dies():
    slots = WorkerSlots(None)
    slot = slots.add()
    old = serving(slots, slot, 100)
    slots.reload()
    assert slots.next_to_replace(T0) is slot
    successor = worker_for(slot, 101)
    slots.successor_started(slot, successor)
    assert slots.vacate(slot)       # `old` died
    assert slot.worker is successor and slot.successor is None
    assert slots.replacements == []
    assert slots.due(T0) == [], "nothing to start: the successor serves"


def test_a_worker_leaving_on_its_own_is_replaced_at_once():
    slots = WorkerSlots(None)
    slot = slots.add()
    serving(slots, slot, 100)
    slots.leaving(slot, T0 + 5.0)
    assert slot.worker is None
    assert slot.start_at == T0 + 5.0
    assert slot.deaths == 0
    assert slots.due(T0 + 5.0) == [slot]


def test_a_newly_started_worker_takes_its_slot_off_the_queue():
    slots = WorkerSlots(None)
    slot = slots.add()
    serving(slots, slot, 100)
    slots.reload()
    slots.vacate(slot)      # it died before its successor started
    serving(slots, slot, 101)
    assert slots.replacements == []


def test_successors_that_keep_dying_end_the_reload():
    slots = WorkerSlots(None)
    first, second = slots.add(), slots.add()
    serving(slots, first, 100)
    serving(slots, second, 101)
    slots.reload()
    delays = []
    now = T0
    for attempt in range(MAX_BOOT_FAILURES):
        slot = slots.next_to_replace(now)
        assert slot is first, "the same slot is tried again"
        slots.successor_started(slot, worker_for(slot, 200 + attempt, now))
        delay = slots.successor_failed(slot, now)
        assert slot.successor is None
        delays.append(delay)
        if delay is not None:
            assert slots.next_to_replace(now) is None, "it waits out the backoff"
            now += delay
    assert delays[:-1] == pytest.approx([RESPAWN_BACKOFF_FIRST, 2 * RESPAWN_BACKOFF_FIRST])
    assert delays[-1] is None
    assert slots.replacements == [] and not slots.reloading
    assert first.successor_failures == 0, "the next reload starts afresh"
    assert first.worker.pid == 100, "the old worker still serves"
    assert slots.restarts == {}



def test_when_replacing_stops_what_max_requests_asked_for_is_tried_again_later():
    # The worker asks once; dropped with the failed reload, a leaking
    # worker would never be replaced.  The reload itself is not retried.
    slots = WorkerSlots(None)
    first, second, third = slots.add(), slots.add(), slots.add()
    leaking = serving(slots, first, 100)
    serving(slots, second, 101)
    serving(slots, third, 102)
    assert slots.recycle(leaking)
    slots.reload()                          # the reload's reason wins, the wish stays
    now = T0
    while (slot := slots.next_to_replace(now)) is not None or slots.replacements:
        if slot is None:
            now += 1.0
            continue
        slots.successor_started(slot, worker_for(slot, 200, now))
        if slots.successor_failed(slot, now) is None:
            break
    assert not slots.reloading
    assert slots.replacements == [first] and first.replace_reason == "recycle"
    assert slots.next_to_replace(now + RECYCLE_RETRY_SECONDS - 1) is None
    assert successor_serving(slots, first, 300, now + RECYCLE_RETRY_SECONDS) is leaking
    assert slots.replacements == [] and not first.recycle_wanted
    assert slots.restarts == {"recycle": 1}


def test_a_reload_does_not_wait_behind_a_recycle_to_be_retried():
    # Replacing stopped; the operator mends what made successors die and
    # reloads: every slot is replaced now, not once the retry comes.
    slots = WorkerSlots(None)
    first, second = slots.add(), slots.add()
    assert slots.recycle(serving(slots, first, 100))
    serving(slots, second, 101)
    for attempt in range(MAX_BOOT_FAILURES):
        now = first.start_at
        slots.successor_started(first, worker_for(first, 200 + attempt, now))
        slots.successor_failed(first, now)
    assert slots.replacements == [first] and first.start_at > now + 1
    slots.reload()
    assert slots.next_to_replace(now) is first


def test_a_new_worker_in_a_slot_has_not_asked_to_be_recycled():
    slots = WorkerSlots(None)
    slot = slots.add()
    assert slots.recycle(serving(slots, slot, 100))
    slot.worker = None                  # it crashed; its slot is started afresh
    slots.started(slot, worker_for(slot, 101))
    assert not slot.recycle_wanted and slots.replacements == []


def test_later_starts_are_timers_those_due_are_not():
    slots = WorkerSlots(None)
    waiting, due, served = slots.add(), slots.add(), slots.add()
    waiting.start_at = T0 + 2.0
    due.start_at = T0
    serving(slots, served, 100)
    slots.recycle(served.worker)
    served.start_at = T0 + 3.0
    assert sorted(slots.starts_after(T0)) == [T0 + 2.0, T0 + 3.0]


def test_removing_a_slot_hands_back_its_workers_successor_first():
    slots = WorkerSlots(None)
    slots.add()
    last = slots.add()
    worker = serving(slots, last, 100)
    slots.reload()
    successor = worker_for(last, 101)
    slots.successor_started(last, successor)
    assert slots.remove_last() == [successor, worker]
    assert last not in slots and len(slots) == 1
    assert last.worker is None and last.successor is None
    assert last not in slots.replacements
