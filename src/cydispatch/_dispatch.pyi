"""What Python sees of the compiled dispatcher (src/dispatch.pyx)."""

import enum
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

POLICIES: tuple[str, ...]
# Upper bounds (seconds) of the request-duration buckets; one more holds the rest.
DURATION_BOUNDS: tuple[float, ...]

class WorkerState(enum.IntEnum):
    WORKER_STARTING = 0
    WORKER_READY = 1
    WORKER_DRAINING = 2
    WORKER_RECYCLE = 3

class Event(enum.IntEnum):
    EVENT_READY = 1
    EVENT_DRAINING = 2
    EVENT_ACCEPT_PAUSED = 8
    EVENT_ACCEPT_RESUMED = 16
    EVENT_WORKER_FULL = 32
    EVENT_RECYCLE = 64
    EVENT_SIGNAL = 128
    EVENT_PYTHON_FD = 256

def send_fds(channel: int, fds: list[int], batch: int = 253) -> int:
    """Hand fds over a channel in messages of at most `batch`; the message count."""

def send_fds_each(channel: int, fds: list[int]) -> int:
    """Hand fds over a channel one message each, up to 253 per sendmmsg; the call count."""

class Dispatcher:
    """The primary's accept loop. Owns the listening fd and every attached channel."""

    def __init__(self, listen_fd: int = -1, wake_fd: int = -1,
                 policy: str = "least-conn", max_conns: int = 1024,
                 queue_depth: int = 2, slow_queue_depth: int = 0) -> None: ...
    def attach(self, slot: int, channel_fd: int, load_fd: int, peer_fd: int = -1) -> None:
        """A new worker in `slot`: its channel, load page and the worker's end (owned)."""
    def detach(self, slot: int) -> int:
        """The worker in `slot` exited; how many connections it never received go to others."""
    def retire(self, slot: int) -> None:
        """Hand `slot` nothing more, then tell its worker to stop."""
    def close_listener(self) -> int:
        """Stop: hand out what the backlog holds, close once it is empty; how many."""
    def silence(self, slot: int) -> float:
        """Seconds since the worker in `slot` last reported (its heartbeat)."""
    def durations(self, slot: int) -> tuple[list[int], float]:
        """(count per bucket of DURATION_BOUNDS and one above, sum of seconds) in `slot`."""
    def load(self, slot: int) -> tuple[int, int, int, int]:
        """(open, queued, in_flight, handed_total) for the worker in `slot`."""
    def lost(self, slot: int) -> int:
        """Connections the worker could not install (out of descriptors) since last asked."""
    def watch_python(self, fd: int) -> None:
        """run() returns (EVENT_PYTHON_FD, fd) while `fd` is readable; one fd, Python's."""
    def run(self, timeout: float) -> list[tuple[int, int]]:
        """Serve until Python has work: [(Event, slot or errno or signal), ...]."""
    @property
    def orphans(self) -> int: ...
    @property
    def accepted(self) -> int: ...
    @property
    def redispatched(self) -> int: ...
    @property
    def reclaimed(self) -> int: ...
    @property
    def stolen(self) -> int:
        """Connections workers took from their siblings' channels (WorkerChannel.steal)."""
    @property
    def listening(self) -> bool: ...
    @property
    def queue_depth(self) -> int:
        """The depth handed with now: slow_queue_depth while slow requests are served."""
    @property
    def full_queue_depth(self) -> int:
        """The depth handed with while every request is fast."""
    @property
    def slow_queue_depth(self) -> int:
        """The depth handed with while slow requests are served (the full one if fixed)."""
    @property
    def slow_spells(self) -> int:
        """How many times the depth went to the slow one."""
    @property
    def slow_seconds(self) -> float:
        """Seconds spent at the slow depth, the spell going on included."""

class WorkerChannel:
    """A worker's end of its channel."""

    def __init__(self, fd: int, load_fd: int = -1) -> None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    open_connections: int
    @property
    def backlogged(self) -> bool: ...
    def receive(self, within_hand: bool = False) -> tuple[list[int], bool, bool, bool]:
        """(fds, stop, final, closed); the primary counted the fds in when it sent them.

        within_hand: take no more once hand_full; the rest stays in the channel."""
    @property
    def hand_full(self) -> bool:
        """Holding --queue-depth connections not reached yet: leave the rest in the channel."""
    def report(self, state: int) -> None: ...
    def heartbeat(self) -> None: ...
    def observe(self, seconds: float) -> None:
        """Count a request answered in `seconds` in the duration histogram."""
    def observe_since_begin(self) -> None:
        """Count a request answered within this callback: the time since begin(),
        or since the request before it in the same read was answered."""
    def opened(self) -> None: ...
    def closed(self) -> None: ...
    def dequeue(self) -> None: ...
    def begin(self) -> None: ...
    def end(self) -> None: ...
    def hold_busy(self, held: bool) -> None:
        """Read as busy until released, whatever begin() and end() say meanwhile."""
    def stamped(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """`coro`, with begin() and end() around each of its steps."""
    @property
    def queued(self) -> int: ...
    @property
    def lost(self) -> int: ...
    def set_fd_room(self, room: int) -> None: ...
    def flush(self) -> bool: ...
    def could_steal(self) -> bool:
        """Handoffs wait for a sibling stuck in a slow request, or (this worker
        idle) two or more wait for a busy one."""
    def steal(self) -> list[int]:
        """Take those (all from a stuck sibling, half from a busy one, no more
        than the hand has room for): this worker's connections from now on."""
    @property
    def stolen(self) -> int: ...
    @property
    def siblings(self) -> list[int]:
        """The slots of the siblings this worker knows of (COMMAND_SIBLING)."""

class HandedSocket:
    """What uvloop's connect_accepted_socket needs of a handed fd, and no more."""
    fd: int
    @property
    def family(self) -> int: ...
    @property
    def type(self) -> int: ...
    def __init__(self, fd: int, family: int) -> None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...

def step_adoption(coroutine: Coroutine[Any, Any, Any], fd: int, protocol: Any,
                  failed: Any) -> Any:
    """One step of a coroutine that adopts `fd`: what it waits for next, None once it has ended."""
