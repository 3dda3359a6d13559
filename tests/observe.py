"""What tests read off a running server: /proc, sockets, answers.

Everything here observes the real processes and kernel state; nothing is
mocked.
"""

from __future__ import annotations

import os
import socket
import struct

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


# The kernel's sock_diag (netlink), as `ss` asks it: /proc/net/tcp lists every
# socket on the machine, tens of thousands once the bench tests have left
# their TIME_WAITs, and reading it then takes long enough (50-200 ms) to miss
# what a test watches for; sock_diag answers for one port in milliseconds.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_TIME_WAIT = 6
NLMSG_HEADER = struct.Struct("=IHHII")      # length, type, flags, sequence, port id
DIAG_REQUEST = struct.Struct("=BBBxI")      # family, protocol, extensions, states
PORTS = struct.Struct("!HH")                # the socket id's source and destination ports
SOCKET_ID_SIZE = 48                         # ports, two 16-byte addresses, interface, cookie
RECEIVE_QUEUE = struct.Struct("=I")         # after the id and `expires`


def tcp_sockets_on(port: int) -> list[tuple[str, int, int]]:
    """(state, peer port, receive queue) of each IPv4 TCP socket on local
    `port`, but those in TIME_WAIT.  The state as /proc/net/tcp writes it;
    a listener's receive queue is its accept queue."""
    states = 0xFFFFFFFF & ~(1 << TCP_TIME_WAIT)
    request = (DIAG_REQUEST.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, states)
               + PORTS.pack(port, 0) + bytes(SOCKET_ID_SIZE - PORTS.size))
    found = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as netlink:
        netlink.sendto(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                                         NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request, (0, 0))
        while True:
            data = netlink.recv(1 << 16)
            offset = 0
            while offset < len(data):
                length, kind = NLMSG_HEADER.unpack_from(data, offset)[:2]
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    raise AssertionError(f"sock_diag refused the request for port {port}")
                body = offset + NLMSG_HEADER.size
                state = data[body + 1]
                local, peer = PORTS.unpack_from(data, body + 4)
                [queue] = RECEIVE_QUEUE.unpack_from(data, body + 4 + SOCKET_ID_SIZE + 4)
                if local == port:
                    found.append((f"{state:02X}", peer, queue))
                offset += (length + 3) & ~3


LISTEN = "0A"


def backlog_and_states(port: int) -> tuple[int, dict[int, str]]:
    """In one look: the accept queue of the listener on `port`, and the TCP
    state of the server's end of each connection to it, by client port."""
    backlog, states = None, {}
    for state, peer, queue in tcp_sockets_on(port):
        if state == LISTEN:
            backlog = queue
        else:
            states[peer] = state
    if backlog is None:
        raise AssertionError(f"no listener on port {port}")
    return backlog, states


def listen_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on `port`."""
    return backlog_and_states(port)[0]


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
    for state, peer, _ in tcp_sockets_on(server_port):
        if peer == client_port and state != LISTEN:
            return state
    raise AssertionError(f"no server side for client port {client_port}")


SYN_RECV = "03"   # handshake done by the client, not accepted by the server
