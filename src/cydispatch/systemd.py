"""systemd: socket activation (LISTEN_FDS) and readiness notification (NOTIFY_SOCKET).

Both are plain protocols over the environment and a datagram socket (see
sd_listen_fds(3) and sd_notify(3)); nothing here needs libsystemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from cydispatch.listener import ListenError, defer_accept

log = logging.getLogger("cydispatch.primary")

SD_LISTEN_FDS_START = 3


def inherited_listener() -> socket.socket | None:
    """The listening socket systemd passed this process, or None.

    Only when LISTEN_PID names this process (the variables may be inherited
    by accident from a parent that was activated); the variables are then
    removed, so that workers do not take them for theirs.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count != "1":
        raise ListenError(f"systemd passed {count or 'no'} sockets (LISTEN_FDS); "
                          "cydispatch serves exactly one")
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise ListenError(f"the socket systemd passed (fd 3) is unusable: {exc.strerror}") \
            from None
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6) \
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ListenError("the socket systemd passed (fd 3) is not a listening TCP socket "
                          "(ListenStream=HOST:PORT in the .socket unit)")
    sock.set_inheritable(False)
    defer_accept(sock)
    return sock


class Notifier:
    """sd_notify: tells the service manager when we are ready, reloading, stopping.

    Without NOTIFY_SOCKET every call does nothing.  With WATCHDOG_USEC, the
    primary pings at half that interval from its loop: a primary whose loop
    stops turning is restarted by systemd.
    """

    def __init__(self) -> None:
        self.address: str | bytes | None = None
        self.sock: socket.socket | None = None
        self.watchdog_interval = 0.0
        self.next_ping = 0.0
        path = os.environ.pop("NOTIFY_SOCKET", "")
        if path.startswith("@"):
            self.address = "\0" + path[1:]     # the abstract namespace
        elif path.startswith("/"):
            self.address = path
        if self.address is None:
            return
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        watchdog_pid = os.environ.pop("WATCHDOG_PID", "")
        usec = os.environ.pop("WATCHDOG_USEC", "")
        if usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
            self.next_ping = time.monotonic()

    def send(self, *lines: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify %s: %s", lines, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=Reloading: replacing workers")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=Stopping: finishing requests in progress")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    @property
    def ping_at(self) -> float | None:
        """When the next watchdog ping is due; None without a watchdog."""
        return self.next_ping if self.watchdog_interval else None

    def ping_if_due(self, now: float) -> None:
        if self.watchdog_interval and now >= self.next_ping:
            self.send("WATCHDOG=1")
            self.next_ping = now + self.watchdog_interval
