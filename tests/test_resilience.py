"""Nothing accepted is lost: workers that stop, hang, crash, recycle; reloads, stops.

Each test drives the real server with the load client (a new connection per
request) while something happens to it, and checks what the clients saw.
The baseline modes run the same scenarios where the README compares them;
what they lose is recorded with `record_property` and asserted only where
the loss is certain.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import APPS, app_server
from http_client import Connection, get
from load_client import LoadClient, failures, summary
from observe import alive, listen_queue, processes_in_group
from cydispatch.bench.server import STARTED, ServerFailed, cpu_seconds
from waiting import DEADLINE, wait_until

CPUS = sorted(os.sched_getaffinity(0))


def state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def stop_process(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: state_of(pid) == "T", message=f"worker {pid} to stop")


def record_losses(record_property, outcomes) -> list:
    """Record what the clients lost (for the README's table); the failed outcomes."""
    lost = failures(outcomes)
    record_property("requests", len(outcomes))
    record_property("failed", summary(lost))
    return lost


def new_workers(server, old: set[int]) -> dict[int, int | None]:
    return {pid: cpu for pid, cpu in server.started_workers().items() if pid not in old}


# A worker that stops serving, then dies

@pytest.mark.parametrize("mode, policy", [
    ("dispatch", "least-conn"), ("dispatch", "round-robin"),
    ("shared", "least-conn"), ("reuseport", "least-conn")])
def test_requests_to_a_stopped_worker_are_served_once_it_dies(
        start_server, record_property, mode, policy):
    server = start_server("--mode", mode, "--policy", policy, "--timeout", "0")
    first = server.started_workers()
    victim = next(iter(first))
    stop_process(victim)
    stopped_at = time.monotonic()
    with LoadClient(server.host, server.port, threads=8) as load:
        # In reuseport mode connections reach the stopped worker's own queue
        # and wait there (soon every thread does: nothing else moves).  In
        # dispatch mode the primary sees that the worker takes nothing off
        # its channel and gives what waits there to the other worker.
        if mode == "reuseport":
            wait_until(lambda: load.stuck(1.0), message="a request held by the stopped worker")
        else:
            wait_until(lambda: load.count("ok") >= 20, message="20 requests served")
        if mode == "dispatch":
            assert not load.stuck(2.0), "a request waits on the stopped worker"
        os.kill(victim, signal.SIGKILL)
        server.wait_for_log(rf"Worker {victim} died \(signal SIGKILL\)")
        wait_until(lambda: new_workers(server, set(first)), message="a replacement worker")
        after_kill = time.monotonic()
        wait_until(lambda: load.count("ok", since=after_kill) >= 20,
                   message="20 requests served after the kill")
    outcomes = [o for o in load.results() if o.started >= stopped_at]
    lost = record_losses(record_property, outcomes)
    assert all(o.pid != victim for o in outcomes if o.kind == "ok")
    if mode == "dispatch":
        # It never read them: the primary gave them to the other worker.
        assert not lost, summary(lost)
    elif mode == "shared":
        # A stopped worker accepts nothing from the shared queue.
        assert not lost, summary(lost)
    else:
        # Its own SO_REUSEPORT queue held them; its death resets them.
        assert lost and {o.kind for o in lost} <= {"reset", "truncated"}


# Rolling reload

@pytest.mark.parametrize("mode", ["dispatch", "shared", "reuseport"])
def test_sighup_replaces_every_worker_under_load(start_server, record_property, mode):
    server = start_server("--mode", mode)
    old = server.started_workers()
    with LoadClient(server.host, server.port, threads=8, pause=0) as load:
        wait_until(lambda: load.count("ok") >= 50, message="50 requests before the reload")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"Reload complete: every worker replaced")
        wait_until(lambda: not any(alive(pid) for pid in old),
                   message="the old workers to exit")
        reloaded = time.monotonic()
        wait_until(lambda: load.count("ok", since=reloaded) >= 50,
                   message="50 requests after the reload")
    outcomes = load.results()
    lost = record_losses(record_property, outcomes)
    new = new_workers(server, set(old))
    assert len(new) == 2
    # Each slot keeps its CPU.
    assert sorted(new.values(), key=str) == sorted(old.values(), key=str)
    assert server.worker_pids() == set(new)
    assert {o.pid for o in outcomes if o.kind == "ok" and o.started >= reloaded} <= set(new)
    assert server.proc.poll() is None
    if mode != "reuseport":
        # The listener never closes: the old workers finish, the new take over.
        assert not lost, summary(lost)
    else:
        # An old worker's own queue goes with it; only resets, never half answers.
        assert {o.kind for o in lost} <= {"reset"}


def test_a_reload_that_cannot_start_new_workers_keeps_the_old_ones(start_server, tmp_path):
    server = start_server(env=broken_uvloop(tmp_path, later=True))
    old = set(server.started_workers())
    (tmp_path / "broken").touch()   # from now on, new workers fail to start
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"Replacement workers die before they are ready")
    assert server.worker_pids() == old
    assert {get(server.host, server.port).pid for _ in range(20)} <= old
    assert not server.find("Reload complete")


def test_a_reload_during_a_reload_leaves_no_worker_from_before_the_second(
        start_server, tmp_path):
    # The first reload's successor is inside its app's startup (it imported
    # the code of then) when the second SIGHUP comes: it serves, then it is
    # replaced in turn, and the reload completes only after that.
    events, gate = tmp_path / "events", tmp_path / "gate"
    gate.touch()
    server = start_server("--app-dir", APPS, "slow_startup:app", workers=1,
                          env={"STARTUP_GATE": str(gate), "STARTUP_EVENTS": str(events)})
    gate.unlink()
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: events.read_text().count("waiting") == 2,
               message="the first reload's successor inside its startup")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"Reloading: replacing", count=2)
    gate.touch()
    server.wait_for_log(r"Reload complete")
    started = [int(line.split()[1]) for line in events.read_text().splitlines()]
    assert len(started) == 3, "the early successor was replaced too"
    assert int(get(server.host, server.port).body) == started[-1]
    assert len(server.find(r"Reload complete")) == 1


# Graceful stop under load

@pytest.mark.parametrize("mode", ["dispatch", "shared", "reuseport"])
def test_sigterm_under_slow_load_finishes_what_was_sent(start_server, record_property, mode):
    server = start_server("--mode", mode)
    with LoadClient(server.host, server.port, path="/slow?ms=50", threads=6) as load:
        wait_until(lambda: load.count("ok") >= 10, message="10 slow requests served")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(DEADLINE) == 0
        exited = time.monotonic()
    outcomes = load.results()
    record_losses(record_property, outcomes)
    assert not processes_in_group(server.pgid)
    # Nothing is ever cut off in the middle of a response.
    assert not [o for o in outcomes if o.kind in ("truncated", "error")], summary(outcomes)
    sent_before = [o for o in outcomes if o.sent is not None and o.sent < signalled]
    record_property("lost_of_sent_before_the_stop", summary(failures(sent_before)))
    if mode == "dispatch":
        # Everything sent before the stop began is answered: the primary hands
        # out the whole backlog before it closes the listener.  (In the
        # baseline modes the last worker to close a listener resets its queue.)
        assert all(o.kind == "ok" for o in sent_before), summary(sent_before)
    # Once the server is gone, connecting is refused, not left hanging.
    assert all(o.kind == "refused" for o in outcomes if o.started > exited)


def test_sigquit_stops_at_once_without_finishing_requests(tmp_path):
    events = tmp_path / "events"
    with app_server(events, "edge_asgi:app", "--graceful-timeout", "120") as server:
        with Connection(server.host, server.port) as client:
            # A request that never finishes while its client stays: a graceful
            # stop would wait the whole --graceful-timeout for it.
            client.send(b"GET /wait-disconnect HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_until(lambda: "waiting" in events.read_text(errors="replace")
                       if events.exists() else False, message="the request to start")
            server.proc.send_signal(signal.SIGQUIT)
            assert server.proc.wait(DEADLINE) == 0
            assert server.find(r"Stopping now")
            assert client.closed_by_server()
        assert not processes_in_group(server.pgid)


# Scaling

@pytest.mark.parametrize("mode", ["dispatch", "shared", "reuseport"])
def test_ttin_adds_a_worker_and_ttou_retires_one(start_server, mode):
    server = start_server("--mode", mode)
    first = server.started_workers()
    server.proc.send_signal(signal.SIGTTIN)
    server.wait_for_log(r"Adding a worker: 3 now")
    added = wait_until(lambda: new_workers(server, set(first)), message="a third worker")
    (pid, cpu) = next(iter(added.items()))
    assert cpu == CPUS[2 % len(CPUS)]
    wait_until(lambda: len(server.worker_pids()) == 3, message="three workers")
    wait_until(lambda: pid in {get(server.host, server.port).pid for _ in range(10)},
               message="the new worker to serve")

    server.proc.send_signal(signal.SIGTTOU)
    server.wait_for_log(r"Removing a worker: 2 now")
    server.wait_for_log(rf"Worker {pid} exited \(exit code 0\)")
    assert server.worker_pids() == set(first)

    server.proc.send_signal(signal.SIGTTOU)
    server.wait_for_log(r"Removing a worker: 1 now")
    server.proc.send_signal(signal.SIGTTOU)
    server.wait_for_log(r"Not removing the last worker")
    wait_until(lambda: len(server.worker_pids()) == 1, message="one worker left")
    assert get(server.host, server.port).status == 200
    assert server.proc.poll() is None


def test_signals_sent_back_to_back_each_count(start_server):
    server = start_server()
    first = set(server.started_workers())

    def delivered(signum: int) -> bool:
        # The kernel itself merges a signal sent while the same one is still
        # pending: wait for the first delivery (not for its handling).
        with open(f"/proc/{server.pid}/status") as f:
            pending = {line.split(":")[0]: int(line.split()[1], 16)
                       for line in f if line.startswith(("SigPnd", "ShdPnd"))}
        return not any(mask & (1 << (signum - 1)) for mask in pending.values())

    for signum, count in ((signal.SIGTTIN, 4), (signal.SIGTTOU, 2)):
        os.kill(server.pid, signum)
        wait_until(lambda: delivered(signum), message="the first signal delivered")
        os.kill(server.pid, signum)
        server.wait_for_log(rf"(Adding|Removing) a worker: {count} now")
        wait_until(lambda: len(server.worker_pids()) == count,
                   message=f"{count} workers")
    assert set(server.worker_pids()) == first


# The watchdog

@pytest.mark.parametrize("mode", ["dispatch", "shared", "reuseport"])
def test_watchdog_replaces_a_hung_worker(start_server, record_property, mode):
    server = start_server("--mode", mode, "--timeout", "2")
    workers = server.started_workers()
    victim, cpu = next(iter(workers.items()))
    stop_process(victim)
    stopped_at = time.monotonic()
    with LoadClient(server.host, server.port, threads=8) as load:
        server.wait_for_log(rf"Worker {victim} has not answered for [\d.]+ s")
        wait_until(lambda: not alive(victim), message="the hung worker to be killed")
        replacement = wait_until(lambda: new_workers(server, set(workers)),
                                 message="a replacement worker")
        assert list(replacement.values()) == [cpu]
        after = time.monotonic()
        wait_until(lambda: load.count("ok", since=after) >= 20,
                   message="20 requests served after the replacement")
    outcomes = [o for o in load.results() if o.started >= stopped_at]
    lost = record_losses(record_property, outcomes)
    if mode == "reuseport":
        # What the kernel queued on the hung worker's own socket is reset.
        assert {o.kind for o in lost} <= {"reset"}
    else:
        # Dispatch re-dispatches what the hung worker never took; a shared
        # socket leaves it to the other worker.
        assert not lost, summary(lost)
    # The other worker, busy but alive, was left alone.
    assert len(server.find(r"has not answered")) == 1


def test_the_primary_waits_for_a_hung_worker_to_die_without_spinning(start_server):
    server = start_server("--timeout", "2")
    victim = next(iter(server.started_workers()))
    stop_process(victim)
    server.wait_for_log(rf"Worker {victim} has not answered")
    # A stopped process ignores SIGTERM: it is killed 3 s later.  Until then
    # the primary has only that timer to wait for.
    before = cpu_seconds(server.pid)
    wait_until(lambda: not alive(victim), message="the hung worker to be killed")
    assert cpu_seconds(server.pid) - before < 0.5



def test_a_worker_killed_by_a_real_time_signal_is_replaced(start_server):
    # signal.Signals has no name for SIGRTMIN+n: describing such an exit
    # once took the primary, and every worker with it, down.
    server = start_server()
    victim = next(iter(server.started_workers()))
    os.kill(victim, signal.SIGRTMIN + 1)
    server.wait_for_log(rf"Worker {victim} died \(signal {int(signal.SIGRTMIN) + 1}\)")
    wait_until(lambda: len(server.started_workers()) == 3, message="a replacement")
    assert alive(server.pid)
    assert get(server.host, server.port).status == 200


def reloaded_while_stuck_at_exit(start_server, graceful: str):
    """One worker of an app that hangs at exit, just replaced by a reload: (server, old pid)."""
    server = start_server("hangs_at_exit:app", "--app-dir", APPS,
                          "--graceful-timeout", graceful, workers=1)
    [old] = server.started_workers()
    server.proc.send_signal(signal.SIGHUP)
    return server, old


def test_a_stop_does_not_spin_on_a_retired_worker_past_its_exit_time(start_server):
    # Replaced by a reload, the old worker hangs at exit; a stop comes before
    # the time it is to be killed by (--graceful-timeout + 2 s after the
    # reload), and lasts past it.  The stop's own deadline kills it; until
    # then the primary has nothing to do.
    server, old = reloaded_while_stuck_at_exit(start_server, "5")
    server.wait_for_log(r"Reload complete")
    time.sleep(2)       # the stop's deadline falls 2 s after the old one's
    assert alive(old)
    before = cpu_seconds(server.pid)
    server.proc.send_signal(signal.SIGTERM)
    used = 0.0
    deadline = time.monotonic() + DEADLINE
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            used = cpu_seconds(server.pid) - before     # a zombie's too
        except FileNotFoundError:
            break
        time.sleep(0.05)
    assert server.proc.poll() is not None, "the stop to end"
    assert not alive(old)
    assert used < 0.5, f"the primary used {used:.2f} s of CPU while it waited"

def test_a_stall_of_the_whole_machine_kills_no_worker(start_server):
    # A virtual machine descheduled by its host, or a laptop resumed from
    # sleep: every process stops at once and resumes at once.  The primary
    # may then run before the workers have sent the heartbeats that fell due
    # meanwhile; their silence says nothing about their loops.
    server = start_server("--timeout", "2")
    workers = server.started_workers()
    os.killpg(server.pgid, signal.SIGSTOP)
    try:
        wait_until(lambda: all(state_of(pid) == "T" for pid in [server.pid, *workers]),
                   message="the primary and its workers to stop")
        time.sleep(2.5)     # the stall itself: longer than --timeout
    finally:
        os.killpg(server.pgid, signal.SIGCONT)
    # Absence needs a window: longer than the watchdog takes to confirm.
    with pytest.raises(ServerFailed, match="timed out"):
        server.wait_for_log(r"has not answered", timeout=2.0)
    assert all(alive(pid) for pid in workers)
    assert server.started_workers() == workers
    assert get(server.host, server.port).status == 200


def test_watchdog_off_leaves_a_stopped_worker_alone(start_server):
    server = start_server("--timeout", "0", "--log-level", "debug")
    victim = next(iter(server.started_workers()))
    stop_process(victim)
    # Absence needs a window: 3 s is longer than any timeout allowed (2 s).
    with pytest.raises(ServerFailed, match="timed out"):
        server.wait_for_log(r"has not answered", timeout=3.0)
    assert alive(victim)
    os.kill(victim, signal.SIGCONT)


# Workers that keep dying

def broken_uvloop(path, later: bool = False) -> dict:
    """Environment in which a worker cannot import uvloop (the primary never does).

    A `uvloop` package on PYTHONPATH shadows the real one: it fails to import,
    or with `later` only once the file `broken` exists, and until then hands
    over to the real uvloop.
    """
    package = path / "uvloop"
    package.mkdir()
    condition = f"os.path.exists({str(path / 'broken')!r})" if later else "True"
    (package / "__init__.py").write_text(
        "import os, sys\n"
        f"if {condition}:\n"
        "    raise ImportError('uvloop broken on purpose by the test')\n"
        f"sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != {str(path)!r}]\n"
        "del sys.modules[__name__]\n"
        "import uvloop\n")
    return {"PYTHONPATH": str(path)}


def test_workers_that_cannot_start_back_off_and_the_primary_exits_3(start_server, tmp_path):
    server = start_server(env=broken_uvloop(tmp_path), ready=False)
    assert server.proc.wait(DEADLINE) == 3
    server.kill()
    assert server.find(r"Worker slot \d keeps dying \(2 times in a row\); next start in 0\.1 s")
    assert server.find(r"Worker slot \d keeps dying \(3 times in a row\); next start in 0\.2 s")
    assert server.find(r"Workers cannot start: each died before it was ready 3 times")
    assert server.find(r"ImportError: uvloop broken on purpose")
    assert not server.find(r"Worker \d+ started")
    assert not processes_in_group(server.pgid)


def test_a_worker_that_keeps_dying_is_restarted_later_and_later(start_server):
    server = start_server(workers=1)
    for deaths in range(1, 4):
        (pid,) = server.worker_pids()
        os.kill(pid, signal.SIGKILL)
        server.wait_for_log(rf"Worker {pid} died")
        server.wait_for_log(r"Worker \d+ started", count=deaths + 1)
    assert server.find(r"keeps dying \(2 times in a row\); next start in 0\.1 s")
    assert server.find(r"keeps dying \(3 times in a row\); next start in 0\.2 s")
    assert get(server.host, server.port).status == 200


# Recycling

@pytest.mark.parametrize("mode", ["dispatch", "shared"])
def test_max_requests_replaces_workers_without_failing_a_request(start_server, mode):
    # (reuseport recycles the same way, and loses what a reload loses there.)
    server = start_server("--mode", mode, "--max-requests", "40",
                          "--max-requests-jitter", "10")
    first = server.started_workers()
    with LoadClient(server.host, server.port) as load:
        server.wait_for_log(r"Worker \d+ served \d+ requests; asking to be replaced")
        server.wait_for_log(r"Replacing worker \d+: it reached --max-requests")
        server.wait_for_log(r"Worker \d+ replaces worker \d+")
        wait_until(lambda: any(not alive(pid) for pid in first),
                   message="a recycled worker to exit")
        after = time.monotonic()
        wait_until(lambda: load.count("ok", since=after) >= 20,
                   message="20 requests after a recycle")
    outcomes = load.results()
    assert not failures(outcomes), summary(failures(outcomes))
    served = server.find(r"Worker \d+ served (\d+) requests")
    assert all(40 <= int(m.group(1)) for m in served)
    # A recycled worker exited cleanly.  Its exit is logged once the primary
    # reaps it, which may come after the test saw it gone (a zombie).
    def recycled() -> set[int]:
        exited = server.find(r"Worker (\d+) exited \(exit code 0\)")
        return {int(m.group(1)) for m in exited} & set(first)
    wait_until(recycled, message="a recycled worker's clean exit in the log")
    # Replacements sit on the CPUs their predecessors had.
    assert set(server.started_workers().values()) == set(first.values())


# The primary out of descriptors when it starts a worker

def test_a_worker_that_cannot_be_started_is_retried_and_service_goes_on(start_server):
    # 22 descriptors: the primary's own, plus four per worker (both ends of
    # its channel, its load page, its message socket), plus three while it
    # starts one; a worker needs about 16.
    server = start_server(workers=1, wrapper=("prlimit", "--nofile=22:22"))
    cannot = r"Cannot start a worker: Too many open files; trying again in [\d.]+ s"
    for added in range(2, 12):
        server.proc.send_signal(signal.SIGTTIN)
        server.wait_for_log(rf"Adding a worker: {added} now")
        wait_until(lambda count=added: server.find(cannot)
                   or len(server.find(STARTED)) >= count,
                   message="the new worker to start or fail")
        if server.find(cannot):
            break
    else:
        pytest.fail("22 descriptors never ran out")
    # It tries again, later each time, and meanwhile the others serve.
    server.wait_for_log(cannot, count=3)
    assert get(server.host, server.port).status == 200
    assert server.proc.poll() is None
    # Fewer workers free descriptors; then a new one starts.  The last slot
    # has no worker (it could not start one): removing it frees nothing.
    workers = len(server.worker_pids())
    slots_to_remove = min(4, added - 1)
    for removed in range(1, slots_to_remove + 1):
        server.proc.send_signal(signal.SIGTTOU)
        server.wait_for_log(rf"Removing a worker: {added - removed} now")
    wait_until(lambda: len(server.worker_pids()) == workers - (slots_to_remove - 1),
               message="the removed slots' workers to retire")
    started = len(server.find(STARTED))
    server.proc.send_signal(signal.SIGTTIN)
    server.wait_for_log(STARTED, count=started + 1)
    assert get(server.host, server.port).status == 200


# Workers that stop on their own, or do not stop

def test_a_worker_that_drains_on_its_own_is_replaced_at_once(start_server):
    server = start_server("--graceful-timeout", "20", workers=1)
    [old] = server.started_workers()
    with Connection(server.host, server.port) as unfinished:
        # A request in progress (its head not complete yet) keeps it draining.
        unfinished.sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n")
        wait_until(lambda: listen_queue(server.port) == 0 and get(server.host, server.port),
                   message="the connection handed to the worker")
        os.kill(old, signal.SIGTERM)        # someone else stops it
        server.wait_for_log(rf"Worker {old} is finishing its connections; "
                            r"starting its successor")
        new = wait_until(lambda: new_workers(server, {old}), message="a successor")
        wait_until(lambda: get(server.host, server.port).pid in new,
                   message="the successor to serve")
        assert alive(old), "the successor serves while the old one finishes"
        unfinished.sock.sendall(b"\r\n")
        assert unfinished.response().pid == old
    server.wait_for_log(rf"Worker {old} exited \(exit code 0\)")


def test_a_worker_stuck_at_exit_is_killed_after_the_graceful_timeout(start_server):
    server, old = reloaded_while_stuck_at_exit(start_server, "1")
    server.wait_for_log(rf"Worker \d+ replaces worker {old}")
    server.wait_for_log(rf"Worker {old} did not exit within --graceful-timeout 1 s; "
                        r"killing it")
    server.wait_for_log(rf"Worker {old} exited \(signal SIGKILL\)")
    assert get(server.host, server.port).body == b"still here"


@pytest.mark.parametrize("mode", ["dispatch", "reuseport", "shared"])
def test_a_worker_stuck_at_exit_on_its_own_is_killed_after_the_graceful_timeout(
        start_server, mode):
    # Its loop ends (SIGQUIT) and closes its channel, but the process hangs
    # on.  It said it was leaving: its successor starts at once, and it is
    # killed after the grace period, the watchdog off (--timeout 0).  The
    # replacement hangs at exit too: the stop that ends the test kills it.
    server = start_server("hangs_at_exit:app", "--app-dir", APPS, "--mode", mode,
                          "--timeout", "0", "--graceful-timeout", "1", workers=1)
    [old] = server.started_workers()
    os.kill(old, signal.SIGQUIT)
    server.wait_for_log(rf"Worker {old} is finishing its connections; starting its successor")
    wait_until(lambda: new_workers(server, {old}), message="a successor")
    server.wait_for_log(rf"Worker {old} did not exit within --graceful-timeout 1 s; "
                        r"killing it")
    server.wait_for_log(rf"Worker {old} exited \(signal SIGKILL\)")
    assert get(server.host, server.port).body == b"still here"
    assert alive(server.pid)


# A stop with a full backlog

def open_files_limit(pid: int) -> tuple[str, str]:
    """(soft, hard) RLIMIT_NOFILE of `pid`, as /proc shows them."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


@pytest.mark.parametrize("limit", ["64:4096", "64:64"])
def test_a_stop_answers_every_request_waiting_in_the_backlog(start_server, limit):
    # 64:4096: the primary raises its soft limit.  64:64: it cannot; each
    # worker has room for a few dozen connections, and the primary hands the
    # backlog out as they free up, keeping the listener until it is empty.
    server = start_server("--graceful-timeout", "60", wrapper=("prlimit", f"--nofile={limit}"))
    workers = server.worker_pids()
    hard = limit.split(":")[1]
    for pid in (server.pid, *workers):
        # Raised to the hard limit at start (as HAProxy and nginx do);
        # workers inherit it.
        assert open_files_limit(pid) == (hard, hard)
    for pid in workers:
        stop_process(pid)
    conns = []
    try:
        for _ in range(400):
            conn = Connection(server.host, server.port)
            conn.request("/")
            conns.append(conn)
        # The primary took up to 4x the queue depth per worker before it saw
        # that they read nothing (it holds those); the rest waits here.
        wait_until(lambda: listen_queue(server.port) >= 360,
                   message="the requests to wait in the backlog")
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_log("Stopping: finishing requests in progress")
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        statuses = []
        for conn in conns:
            statuses.append(conn.response().status)
            conn.close()    # as a client does once answered: frees the worker's fd
        assert statuses == [200] * 400
    finally:
        for conn in conns:
            conn.close()
    assert server.proc.wait(DEADLINE) == 0
