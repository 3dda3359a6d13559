"""Waiting for a condition with a deadline: the only way tests wait."""

from __future__ import annotations

import asyncio
import time

# Generous: the machine is small and shared; conditions are polled, so a fast
# run does not wait for this long.
DEADLINE = 30.0


def wait_until(condition, timeout: float = DEADLINE, interval: float = 0.02,
               message: str = "condition"):
    """Poll `condition` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := poll(condition, deadline, timeout, message)):
        time.sleep(interval)
    return value


async def wait_until_async(condition, timeout: float = DEADLINE, interval: float = 0.01,
                           message: str = "condition"):
    """wait_until inside an event loop: the loop turns while it polls."""
    deadline = time.monotonic() + timeout
    while not (value := poll(condition, deadline, timeout, message)):
        await asyncio.sleep(interval)
    return value


def poll(condition, deadline: float, timeout: float, message: str):
    """condition()'s value; an AssertionError if it is falsy at the deadline."""
    value = condition()
    if not value and time.monotonic() >= deadline:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
    return value
