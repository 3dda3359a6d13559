"""The one source of configuration: built from CLI flags and CYDISPATCH_* variables.

The primary builds a Settings once and passes it down; workers receive it as
JSON on their command line.  Nothing re-reads flags or the environment later.
"""

from __future__ import annotations

import dataclasses
import json
import os

MODES = ("dispatch", "reuseport", "shared")
POLICIES = ("least-conn", "round-robin")
LOG_LEVELS = ("debug", "info", "warning", "error")

ENV_PREFIX = "CYDISPATCH_"
# Workers send a heartbeat once a second; a watchdog shorter than two beats
# would kill workers whose loop merely ran one request of up to a second.
MIN_TIMEOUT = 2.0


def available_cpus() -> list[int]:
    """The CPUs this process may run on, which may be fewer than the machine has."""
    return sorted(os.sched_getaffinity(0))


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = dataclasses.field(default_factory=lambda: len(available_cpus()))
    mode: str = "dispatch"
    policy: str = "least-conn"
    pin: bool = True
    backlog: int = 2048
    max_conns: int = 1024
    queue_depth: int = 0            # 0: auto, see auto_queue_depth
    graceful_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    timeout: float = 30.0           # watchdog: a worker silent this long is killed
    max_requests: int = 0           # recycle a worker after this many; 0: never
    max_requests_jitter: int = 0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be between 0 and 65535")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}")
        if self.backlog < 1:
            raise ValueError("--backlog must be at least 1")
        if self.max_conns < 1:
            raise ValueError("--max-conns must be at least 1")
        if self.queue_depth < 0:
            raise ValueError("--queue-depth must be auto or at least 1")
        if self.graceful_timeout < 0:
            raise ValueError("--graceful-timeout must not be negative")
        if self.keepalive_timeout <= 0:
            raise ValueError("--keepalive-timeout must be positive")
        if self.timeout != 0 and self.timeout < MIN_TIMEOUT:
            raise ValueError(f"--timeout must be 0 (off) or at least {MIN_TIMEOUT:g} "
                             "seconds (workers beat once a second)")
        if self.max_requests < 0:
            raise ValueError("--max-requests must not be negative")
        if self.max_requests_jitter < 0:
            raise ValueError("--max-requests-jitter must not be negative")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


def auto_queue_depth(workers: int, cpus: int) -> int:
    """The queue depth when --queue-depth is auto: 2 per worker sharing a CPU.

    With a CPU each, 2 keeps the tail short under uneven work (measured in
    bench/RESULTS.md).  Workers that take turns on a CPU catch up only on
    their turn, and each small batch costs a round of context switches on
    that CPU: they get proportionally more at a time.
    """
    return 2 * -(-workers // max(cpus, 1))


def env_default(name: str, fallback):
    """The CYDISPATCH_<NAME> variable for a flag, or `fallback`."""
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), fallback)
