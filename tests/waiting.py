"""Waiting for a condition with a deadline: the only way tests wait."""

from __future__ import annotations

import time

# Generous: the machine is small and shared; conditions are polled, so a fast
# run does not wait for this long.
DEADLINE = 30.0


def wait_until(condition, timeout: float = DEADLINE, interval: float = 0.02,
               message: str = "condition"):
    """Poll `condition` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)
