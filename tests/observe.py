"""What tests read off a running server: /proc, sockets, answers.

Everything here observes the real processes and kernel state; nothing is
mocked.
"""

from __future__ import annotations

import os

from cydispatch.bench.server import cpu_seconds
from http_client import get
from waiting import wait_until


def children_of(pid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(entry))
    return children


def processes_in_group(pgid: int) -> set[int]:
    members = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == pgid:
            members.add(int(entry))
    return members


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets in LISTEN state on `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port and fields[3] == "0A":
                inodes.add(int(fields[9]))
    return inodes


def backlog_and_states(port: int) -> tuple[int, dict[int, str]]:
    """In one read of /proc/net/tcp: the accept queue of the listener on
    `port`, and the TCP state of the server's end of each connection to it,
    by client port."""
    backlog, states = None, {}
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rpartition(":")[2], 16) != port:
                continue
            if fields[3] == "0A":
                backlog = int(fields[4].partition(":")[2], 16)
            else:
                states[int(fields[2].rpartition(":")[2], 16)] = fields[3]
    if backlog is None:
        raise AssertionError(f"no listener on port {port}")
    return backlog, states


def listen_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on `port`."""
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "0A":
                return int(fields[4].partition(":")[2], 16)
    raise AssertionError(f"no listener on port {port}")


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def pids_answering(server, count: int) -> list[int]:
    return [get(server.host, server.port).pid for _ in range(count)]


def distinct_workers_answer(server, wanted: int = 2) -> set[int]:
    seen: set[int] = set()
    wait_until(lambda: seen.add(get(server.host, server.port).pid) or len(seen) >= wanted,
               interval=0, message=f"{wanted} distinct workers to answer")
    return seen


def busy_worker(server, conn, path: str) -> int:
    """Send `path` and wait until a worker is burning CPU on it; its pid."""
    workers = list(server.started_workers())
    before = {pid: cpu_seconds(pid) for pid in workers}
    conn.request(path)
    return wait_until(lambda: next((pid for pid in workers
                                    if cpu_seconds(pid) - before[pid] >= 0.05), None),
                      message="a worker to start on the request")


def server_side_state(server_port: int, client_port: int) -> str:
    """The TCP state (as /proc/net/tcp writes it) of the server's end of a connection."""
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            local = int(fields[1].rpartition(":")[2], 16)
            remote = int(fields[2].rpartition(":")[2], 16)
            if local == server_port and remote == client_port:
                return fields[3]
    raise AssertionError(f"no server side for client port {client_port}")


SYN_RECV = "03"   # handshake done by the client, not accepted by the server
