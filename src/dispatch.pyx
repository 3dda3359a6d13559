# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The primary's accept loop, and the fd handoff both ends of a channel use.

The primary waits in epoll on the listening socket, one channel per worker
(a SOCK_SEQPACKET socketpair) and a wake-up fd written by signal handlers.
When the listener is readable it accepts until EAGAIN, picks a worker for
each connection and, once per wake-up, sends every worker its batch in one
sendmmsg, a message per fd as SCM_RIGHTS (so that the worker can take them
one at a time and leave the rest to be taken back).  Nothing in that path
creates a Python object: connections are ints in C arrays from accept4 to
close.

The primary closes its copy of each fd as soon as the send succeeds: the
worker's copy is then the only one, and the worker's close tears the TCP
connection down.  Nothing is lost if the worker dies first: the primary keeps
the worker's end of the channel open too, and a handoff the worker has not
received is still in that end's receive queue, so the primary takes it back
with recvmsg and gives it to another worker.  A handoff the worker has
received is the worker's: nothing is acknowledged, nothing is handed twice.
The same recvmsg takes handoffs back from a worker that is stuck in a slow
request, which a kernel queue (SO_REUSEPORT, a shared socket) never can.

Each worker shares a load page with the primary (LoadPage): how many
connections it holds open, how many of those it has not reached the first
request of yet (its queue), and since when it has been inside a
request's callbacks, if it is.  The primary counts a connection into both
when it sends it and the worker counts it out, so the counts include what is
in flight, and none of this costs a message or a wake-up.  A worker whose
queue holds CHANNEL_AHEAD_FACTOR * `queue_depth` connections gets no more, and
neither does one that has been inside one request for over 300 microseconds
(it is busy with slow work) or has taken nothing off its channel for 5 ms
(frozen): new connections wait in the listener's backlog, one queue for all
workers, and go to the first worker that catches up.  The worker itself
takes only `queue_depth` of its queue in hand at a time (LoadPage.hand_limit);
the rest waits in its channel, where it can be taken back.  A request stuck
behind a slow one in a worker's queue is what makes tail latency; short
queues that can be emptied into another worker keep that short.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject
from cpython.ref cimport Py_XDECREF
from libc cimport errno
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset, strerror
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec
from posix.unistd cimport close, dup, read

import os

from system cimport (
    atomic_add_u32, atomic_cas_u32, atomic_exchange_u32, atomic_load_u32, atomic_store_u32,
    atomic_sub_u32, relaxed_load_u64, relaxed_store_u64, CMSG_DATA, CMSG_FIRSTHDR, CMSG_LEN, CMSG_SPACE, EPOLL_CLOEXEC,
    EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLIN, MAP_FAILED,
    MAP_SHARED, MSG_CMSG_CLOEXEC, MSG_CTRUNC, MSG_DONTWAIT, MSG_NOSIGNAL,
    PROT_READ, PROT_WRITE, SCM_RIGHTS, SOCK_CLOEXEC, SOCK_NONBLOCK,
    SOL_SOCKET, IPPROTO_TCP, TCP_INFO, tcp_info, getsockopt, socklen_t, accept4, cmsghdr, epoll_create1, epoll_ctl, epoll_event,
    epoll_wait, mmap, mmsghdr, msghdr, munmap, recvmmsg, recvmsg, send,
    sendmmsg, sendmsg,
)


cdef enum:
    # SCM_MAX_FD: the kernel refuses more fds than this in one message.
    MAX_FDS_PER_MESSAGE = 253
    # Bounds one wake-up, so reports and signals are not starved under a
    # flood of new connections.
    MAX_ACCEPTS_PER_WAKE = 1024
    MAX_EPOLL_EVENTS = 64
    MAX_REPORTS_PER_READ = 32
    # Signals remembered between two returns of Dispatcher.run (one byte
    # each on the wake-up fd); more than this in one turn are dropped.
    MAX_PENDING_SIGNALS = 64
    # A worker inside one request's callbacks for longer than this is busy
    # with slow work: serving a plain request takes tens of microseconds.
    STUCK_MICROSECONDS = 300
    # A worker that takes nothing off its channel for this long, with
    # handoffs waiting there and room in hand, is not reading (frozen,
    # swapped out).  Longer than STUCK_MICROSECONDS: on a busy machine a
    # healthy worker may wait a scheduler slice or two to run at all.
    NOT_READING_MICROSECONDS = 5000
    # While some worker is stuck, the others may hold this many times
    # --queue-depth unanswered: they take the load in bigger batches, as a
    # free worker on a shared socket takes everything waiting.  Measured
    # under the skew workload (bench/RESULTS.md): 4 left p99 15% above a
    # shared socket's, 16 within 3-4%, 64 doubled it (the free worker then
    # holds dozens when it meets a slow request of its own).
    STUCK_DEPTH_FACTOR = 16
    # A worker inside one request for longer than this is serving slow work:
    # while one has been seen within SLOW_MEMORY_SECONDS, the primary hands
    # with the shallower of its two depths (Dispatcher._adapt_depth).  Well
    # above what a fast request can spend waiting for a shared CPU: at 5 ms,
    # two workers taking turns on one CPU under `close` were often caught
    # waiting, and handed shallow batches all the time (0.79x-0.89x a
    # shared socket's throughput, against 0.97x-1.15x at 15 ms).
    SLOW_REQUEST_MICROSECONDS = 15000
    # A worker takes in hand at most --queue-depth connections it has not
    # reached yet; the primary may queue this many times as many for it,
    # the rest waiting in its channel.  The worker then goes from one
    # connection to the next without sleeping and the primary wakes it once
    # per batch (at 1x, a wake-up each per connection or two: the primary's
    # CPU per connection was 2.5x as high), and what waits in the channel is
    # not behind a slow request: it is taken back if the worker gets stuck.
    CHANNEL_AHEAD_FACTOR = 4
    LOAD_PAGE_SIZE = 4096
    # Buckets of the request-duration histogram: DURATION_BOUNDS_US, then
    # one for everything slower.
    DURATION_BUCKETS = 18

# Upper bounds of the request-duration buckets, in microseconds: from what
# the built-in app takes (tens of microseconds) to a request of 10 s.
cdef uint64_t DURATION_BOUNDS_US[DURATION_BUCKETS - 1]
DURATION_BOUNDS_US[:] = [
    50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000,
    250000, 500000, 1000000, 2500000, 5000000, 10000000]
DURATION_BOUNDS = tuple(bound / 1e6 for bound in DURATION_BOUNDS_US)

# epoll tags: a channel is tagged with its slot index, these with values no
# slot index can take.
cdef uint64_t TAG_LISTENER = 1ULL << 40
cdef uint64_t TAG_WAKE = 2ULL << 40
cdef uint64_t TAG_PYTHON = 3ULL << 40

# How long accepting pauses when the process is out of descriptors: long
# enough not to spin, short enough that service resumes as soon as
# connections close.
cdef double ACCEPT_PAUSE_SECONDS = 0.1
# A worker that could not install a handoff (out of descriptors) gets nothing
# beyond its current load for this long, so its connections are not bounced
# between full workers in a loop.
cdef double WORKER_FULL_SECONDS = 1.0
# A worker short of descriptors is warned of at most this often while it
# lasts: its count comes and goes with every close, and with handoffs taken
# back from it and handed to it again; one line a minute tells an operator as
# much as one per refill.
cdef double FULL_WARNING_SECONDS = 60.0
# How soon the loop looks again at a worker that has handoffs waiting in its
# channel and has not taken any since it last looked: rare enough not to
# cost wake-ups under load (a worker reads within microseconds), soon enough
# that a frozen worker's connections move on at once to a client.
cdef double UNREAD_RECHECK_SECONDS = 0.005
# How soon a stop that found a sibling taking from the worker's channel is
# tried again: the sibling is in there for a few system calls.
cdef double GATE_RECHECK_SECONDS = 0.001
# How long the shallower depth stays after the last slow request was seen.
cdef double SLOW_MEMORY_SECONDS = 1.0


# Wire format.  Both ends are this module on one machine, so native layout.

cdef enum Command:          # primary -> worker
    COMMAND_HANDOFF = 1     # fds in SCM_RIGHTS, `count` of them
    COMMAND_STOP = 2        # finish what you hold: close idle connections
    COMMAND_FINAL = 3       # nothing follows: exit once you hold nothing
    COMMAND_WAKE = 4        # what waited in your channel was taken back:
                            # say that your loop turns (see _observe_busy)
    COMMAND_SIBLING = 5     # a sibling's channel end and load page, 2 fds
                            # (none: that sibling has gone); its slot in
                            # the bits above COMMAND_MASK

cdef enum:
    COMMAND_MASK = 0xFF
    COMMAND_SLOT_SHIFT = 8

cdef struct CommandMessage:
    uint32_t command
    uint32_t count

cdef struct ReportMessage:  # worker -> primary; every report is also a heartbeat
    uint32_t state          # a WorkerState
    uint32_t lost           # handed connections it could not install since
                            # its last report (out of descriptors)

# LoadPage.steal_gate.  A sibling takes from a worker's channel only
# between a successful OPEN -> STEALING and its STEALING -> OPEN; the
# primary closes the gate (OPEN -> CLOSED) before it sends a command other
# than a handoff, and waits while a sibling is in (see _close_gate), so a
# sibling never takes a stop meant for the worker.
cdef enum:
    STEAL_CLOSED = 0
    STEAL_OPEN = 1
    STEAL_STEALING = 2

cdef struct HandoffControl:  # ancillary buffer for one handoff
    cmsghdr header
    int fds[MAX_FDS_PER_MESSAGE]


# The page a worker shares with the primary (a memfd both map).
#
# `open` and `queued` are raised by the primary before it sends a handoff
# (and lowered again if the send fails or it takes the handoff back) and
# lowered by the worker as connections are answered and close, so they count
# what is in flight in the channel too and never dip below zero.
#
# The nudge is a store-then-load handshake on each side, so that the primary
# cannot go to sleep waiting for a worker to have room while the worker makes
# room unseen: the primary sets `nudge` and then reads the page; the worker
# lowers a count or clears `busy_since` and then reads `nudge`, and if it is
# set, clears it and sends a report, which wakes the primary.  With
# sequentially consistent accesses at least one side sees the other's write.
cdef struct LoadPage:
    uint32_t open       # connections handed to the worker and not closed
    uint32_t queued     # of those, first request not reached yet (answered,
                        # or the app started on it)
    uint32_t nudge      # set by the primary, cleared by the worker
    uint32_t busy_since  # microsecond clock (wrapping) when the worker entered
                         # a request's callbacks; 0 when it is between them
    uint32_t received   # fds the worker took off its channel (wrapping)
    uint32_t fd_room    # connections the worker has descriptors for; 0: unknown
    uint32_t hand_limit  # --queue-depth, written by the primary: connections
                         # the worker takes off its channel before it has
                         # reached them (0: no limit)
    uint32_t nudge_below  # written by the primary: a worker asked for a
                          # nudge sends it only once its queue is down to
                          # this (0: at once), so that the primary wakes
                          # once per batch, not once per connection
    uint32_t sent       # handoffs the primary sent (wrapping), and of those
    uint32_t reclaimed  # taken back by it or by a sibling: what waits in the
                        # channel is sent - reclaimed - received
    uint32_t steal_gate  # STEAL_*: whether siblings may take from the channel
    uint32_t stolen     # connections this worker took from siblings' channels
    uint32_t max_conns  # --max-conns, written by the primary: a worker takes
                        # no more from its siblings past it
    uint32_t reintroduce  # set by a sibling that took an introduction (a
                          # COMMAND_SIBLING) meant for this worker: the
                          # primary sends them all again
    uint64_t durations[DURATION_BUCKETS]  # requests answered, by how long
                                          # they took (see observe())
    uint64_t duration_sum_us  # the sum of those durations
    uint32_t busy_pool  # busy_since is a full thread pool's (hold_busy),
                        # not one request's: see pool_full


cpdef enum WorkerState:     # a worker's state, as it reports it
    WORKER_STARTING = 0
    WORKER_READY = 1
    WORKER_DRAINING = 2
    WORKER_RECYCLE = 3      # serving, and asking to be replaced (max requests)

cpdef enum Event:           # what run() returns: (event, slot, errno or signal)
    EVENT_READY = 1             # the worker in the slot reported ready
    EVENT_DRAINING = 2          # the worker is finishing up of its own accord
    EVENT_ACCEPT_PAUSED = 8     # accept failed for lack of descriptors or memory
    EVENT_ACCEPT_RESUMED = 16   # a connection was accepted again after a pause
    EVENT_WORKER_FULL = 32      # the worker holds all it has descriptors for
    EVENT_RECYCLE = 64          # the worker asks to be replaced; it still serves
    EVENT_SIGNAL = 128          # a signal arrived (one event per delivery)
    EVENT_PYTHON_FD = 256       # the fd given to watch_python is readable

POLICIES = ("least-conn", "round-robin")
cdef enum Policy:
    POLICY_LEAST_CONN = 0
    POLICY_ROUND_ROBIN = 1

cdef enum SlotState:
    SLOT_EMPTY = 0      # no worker attached
    SLOT_STARTING = 1   # attached, waiting for the worker to report ready
    SLOT_ACTIVE = 2     # receives new connections
    SLOT_RETIRING = 3   # finishes what it holds, gets nothing new


cdef struct OneFdControl:   # ancillary buffer for a handoff of one fd
    cmsghdr header
    int fd

cdef struct HandoffMessages:  # a batch as one message per fd, for sendmmsg
    mmsghdr headers[MAX_FDS_PER_MESSAGE]
    iovec iovs[MAX_FDS_PER_MESSAGE]
    CommandMessage commands[MAX_FDS_PER_MESSAGE]
    OneFdControl controls[MAX_FDS_PER_MESSAGE]


if sizeof(HandoffControl) < CMSG_SPACE(MAX_FDS_PER_MESSAGE * sizeof(int)):
    raise ImportError("HandoffControl is smaller than CMSG_SPACE(253 fds)")
if sizeof(OneFdControl) < CMSG_SPACE(sizeof(int)):
    raise ImportError("OneFdControl is smaller than CMSG_SPACE(1 fd)")
if sizeof(LoadPage) > LOAD_PAGE_SIZE:
    raise ImportError("LoadPage does not fit in LOAD_PAGE_SIZE")


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint32_t clock_us() noexcept nogil:
    """A microsecond clock that wraps every 71 minutes; never 0 (0 means idle)."""
    cdef timespec ts
    cdef uint32_t now
    clock_gettime(CLOCK_MONOTONIC, &ts)
    now = <uint32_t>(<uint64_t>ts.tv_sec * 1000000 + <uint64_t>ts.tv_nsec // 1000)
    return now if now else 1


cdef int raise_errno(int err) except -1:
    # OSError(errno, text) picks the matching subclass (BlockingIOError, ...).
    raise OSError(err, strerror(err).decode())


# A queue of fds, oldest first, in a ring that grows by doubling.

cdef struct FdQueue:
    int *fds
    uint32_t head
    uint32_t count
    uint32_t capacity   # zero or a power of two, so positions wrap by mask


cdef int fdq_grow(FdQueue *q) except -1:
    cdef uint32_t capacity = q.capacity * 2 if q.capacity else 64
    cdef int *fds = <int *>malloc(capacity * sizeof(int))
    cdef uint32_t k
    if fds == NULL:
        raise MemoryError()
    for k in range(q.count):
        fds[k] = q.fds[(q.head + k) & (q.capacity - 1)]
    free(q.fds)
    q.fds = fds
    q.head = 0
    q.capacity = capacity
    return 0


cdef inline int fdq_push(FdQueue *q, int fd) except -1:
    if q.count == q.capacity:
        fdq_grow(q)
    q.fds[(q.head + q.count) & (q.capacity - 1)] = fd
    q.count += 1
    return 0


cdef inline int fdq_pop(FdQueue *q) noexcept:
    cdef int fd = q.fds[q.head]
    q.head = (q.head + 1) & (q.capacity - 1)
    q.count -= 1
    return fd


cdef void fdq_close_all(FdQueue *q) noexcept:
    while q.count:
        close(fdq_pop(q))
    free(q.fds)
    q.fds = NULL
    q.capacity = 0


cdef int send_handoff(int channel, const int *fds, int count,
                      uint32_t kind=COMMAND_HANDOFF) noexcept nogil:
    """Send `count` (<= 253) fds in one message; 0 or the errno."""
    cdef CommandMessage command
    cdef HandoffControl control
    cdef iovec iov
    cdef msghdr msg
    cdef cmsghdr *header
    command.command = kind
    command.count = <uint32_t>count
    iov.iov_base = &command
    iov.iov_len = sizeof(command)
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    msg.msg_control = &control
    msg.msg_controllen = CMSG_SPACE(count * sizeof(int))
    header = CMSG_FIRSTHDR(&msg)
    header.cmsg_level = SOL_SOCKET
    header.cmsg_type = SCM_RIGHTS
    header.cmsg_len = CMSG_LEN(count * sizeof(int))
    memcpy(CMSG_DATA(header), fds, count * sizeof(int))
    while sendmsg(channel, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0:
        if errno.errno != errno.EINTR:
            return errno.errno
    return 0


cdef int send_handoffs(int channel, const int *fds, int count,
                       HandoffMessages *out) noexcept nogil:
    """Send `count` (<= 253) fds, one message each, in one sendmmsg.

    One message per fd, so that a worker can take them off its channel one
    at a time (see LoadPage.hand_limit) and leave the rest to be taken back.
    Returns how many were sent (the first ones), or -errno when none was.
    """
    cdef int k, sent = 0, n
    cdef msghdr *msg
    cdef cmsghdr *header
    for k in range(count):
        out.commands[k].command = COMMAND_HANDOFF
        out.commands[k].count = 1
        out.iovs[k].iov_base = &out.commands[k]
        out.iovs[k].iov_len = sizeof(CommandMessage)
        msg = &out.headers[k].msg_hdr
        memset(msg, 0, sizeof(msghdr))
        msg.msg_iov = &out.iovs[k]
        msg.msg_iovlen = 1
        msg.msg_control = &out.controls[k]
        msg.msg_controllen = CMSG_SPACE(sizeof(int))
        header = CMSG_FIRSTHDR(msg)
        header.cmsg_level = SOL_SOCKET
        header.cmsg_type = SCM_RIGHTS
        header.cmsg_len = CMSG_LEN(sizeof(int))
        memcpy(CMSG_DATA(header), &fds[k], sizeof(int))
    while sent < count:
        n = sendmmsg(channel, &out.headers[sent], count - sent,
                     MSG_DONTWAIT | MSG_NOSIGNAL)
        if n < 0:
            if errno.errno == errno.EINTR:
                continue
            return sent if sent else -errno.errno
        sent += n
    return sent


cdef ssize_t receive_command(int channel, CommandMessage *command,
                             HandoffControl *control, int **fds,
                             uint32_t *installed) noexcept nogil:
    """Take one message off `channel`, without waiting.

    Returns its length, 0 at the end of the stream, or -1 with errno set.
    For a handoff, `*installed` of its `command.count` fds are now this
    process's, at `*fds`: when the process is out of descriptors the kernel
    installs the first ones, closes the rest and sets MSG_CTRUNC.
    """
    cdef iovec iov
    cdef msghdr msg
    cdef cmsghdr *header
    cdef ssize_t received
    installed[0] = 0
    command.command = 0
    command.count = 0
    iov.iov_base = command
    iov.iov_len = sizeof(CommandMessage)
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    msg.msg_control = control
    msg.msg_controllen = sizeof(HandoffControl)
    while True:
        received = recvmsg(channel, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
        if received >= 0 or errno.errno != errno.EINTR:
            break
    if received > 0:
        header = CMSG_FIRSTHDR(&msg)
        if (header != NULL and header.cmsg_level == SOL_SOCKET
                and header.cmsg_type == SCM_RIGHTS):
            installed[0] = <uint32_t>((header.cmsg_len - CMSG_LEN(0)) // sizeof(int))
            fds[0] = <int *>CMSG_DATA(header)
    return received


cdef int send_command(int channel, uint32_t command) noexcept nogil:
    cdef CommandMessage message
    message.command = command
    message.count = 0
    while send(channel, &message, sizeof(message),
               MSG_DONTWAIT | MSG_NOSIGNAL) < 0:
        if errno.errno != errno.EINTR:
            return errno.errno
    return 0


def send_fds(int channel, fds, int batch=MAX_FDS_PER_MESSAGE):
    """Hand `fds` over `channel` in messages of at most `batch` fds.

    The primary's loop uses the same C function; this entry point exists for
    tests and microbenchmarks.  Returns the number of messages sent.
    """
    cdef int buffer[MAX_FDS_PER_MESSAGE]
    cdef int count = 0, messages = 0, err
    if not 1 <= batch <= MAX_FDS_PER_MESSAGE:
        raise ValueError(f"batch must be between 1 and {MAX_FDS_PER_MESSAGE}")
    for fd in fds:
        buffer[count] = fd
        count += 1
        if count == batch:
            err = send_handoff(channel, buffer, count)
            if err:
                raise_errno(err)
            messages += 1
            count = 0
    if count:
        err = send_handoff(channel, buffer, count)
        if err:
            raise_errno(err)
        messages += 1
    return messages


def send_fds_each(int channel, fds):
    """Hand `fds` over `channel` as the primary's loop does: one message per fd,
    up to 253 of them in one sendmmsg.

    For tests and microbenchmarks.  Returns the number of sendmmsg calls.
    """
    cdef HandoffMessages *out = <HandoffMessages *>malloc(sizeof(HandoffMessages))
    cdef int buffer[MAX_FDS_PER_MESSAGE]
    cdef int count = 0, calls = 0, sent, k
    cdef list pending = list(fds)
    if out == NULL:
        raise MemoryError()
    try:
        while pending:
            count = min(len(pending), MAX_FDS_PER_MESSAGE)
            for k in range(count):
                buffer[k] = pending[k]
            with nogil:
                sent = send_handoffs(channel, buffer, count, out)
            if sent < 0:
                raise_errno(-sent)
            calls += 1
            del pending[:sent]
            if sent < count:
                raise_errno(errno.EAGAIN)   # the channel is full
        return calls
    finally:
        free(out)


cdef LoadPage *map_load_page(int load_fd) except NULL:
    cdef void *page = mmap(NULL, LOAD_PAGE_SIZE, PROT_READ | PROT_WRITE,
                           MAP_SHARED, load_fd, 0)
    if page == MAP_FAILED:
        raise_errno(errno.errno)
    return <LoadPage *>page


# The primary.

cdef struct Slot:
    int channel             # primary's end of the socketpair, -1 when empty
    int peer                # the worker's end: what it has not received is there
    int load_fd             # its load page, for its siblings (COMMAND_SIBLING)
    SlotState state
    bint congested          # its channel was full; skipped until it reads
    uint32_t congested_at   # (waiting_in_channel then) or reports
    bint stop_pending       # COMMAND_STOP not sent yet
    bint final_pending      # COMMAND_FINAL not sent yet
    LoadPage *page          # shared with the worker
    uint32_t full_at        # load at which it ran out of descriptors...
    double full_until       # ...which caps it until then; 0 when not capped
    uint32_t lost           # connections it could not install, not yet told
    double full_warned_at   # when it was last said to hold all it has
                            # descriptors for; 0: never
    uint32_t events         # EVENT_* bits not yet returned to Python
    bint recycle_asked      # EVENT_RECYCLE was returned for this worker
    double last_heard       # when its last report came: the watchdog's clock
    bint stuck              # in one request for over STUCK_MICROSECONDS, or
                            # not reading its channel for as long (_pick)
    uint32_t seen_received  # page.received when last looked at, and since
    uint32_t seen_at        # when it has not moved with handoffs waiting (0: it moves)
    bint not_reading        # ...for too long: stuck until it reads or reports
    bint pool_full          # stuck because every thread of its pool is busy
    uint64_t handed_total   # connections handed to this worker, for stats
    uint32_t orphaned       # left for others when its channel closed
    int batch_len
    int batch[MAX_FDS_PER_MESSAGE]  # accepted this wake-up, not yet sent
    # Its page's duration counts, kept when the channel closed (the page is
    # let go then) until detach: the supervisor folds them in at its exit.
    # Last: read once per worker, away from what each connection touches.
    bint counts_kept
    uint64_t kept_durations[DURATION_BUCKETS]
    uint64_t kept_duration_sum_us


cdef inline uint32_t waiting_in_channel(LoadPage *page) noexcept:
    """Handoffs sent to the page's worker that are still in its channel.

    Read by the primary and by siblings.  A worker counts what it receives
    as it takes it, and the primary counts a send just after it, so for a
    moment `received` can be ahead: a "negative" count is nothing waiting.
    """
    cdef uint32_t waiting = (atomic_load_u32(&page.sent)
                             - atomic_load_u32(&page.reclaimed)
                             - atomic_load_u32(&page.received))
    return 0 if waiting >= 0x80000000 else waiting


cdef inline bint pool_full(LoadPage *page, uint32_t busy_for) noexcept:
    """Whether a busy worker is a full thread pool rather than slow work.

    A WSGI worker marks itself busy while every thread of its pool is taken
    (WorkerChannel.hold_busy).  It starts on what waits in its channel as
    soon as a thread is free: taken back, that goes to another worker only
    as soon, unless one is free (Dispatcher._observe_busy).  Full for as
    long as slow work takes, it counts as slow work.
    """
    return (atomic_load_u32(&page.busy_pool) != 0
            and busy_for <= SLOW_REQUEST_MICROSECONDS)


cdef inline void close_all(const int *fds, int count) noexcept nogil:
    cdef int k
    for k in range(count):
        close(fds[k])


@cython.final
cdef class Dispatcher:
    """Accepts on one listener and hands connections to the workers' channels.

    Slots are numbered by the supervisor; a slot holds one worker at a time.
    The dispatcher owns the listening fd and every attached channel fd.
    """

    cdef:
        int epfd
        int listen_fd
        int wake_fd
        int python_fd           # watched for Python (watch_python), -1: none
        bint python_fd_ready
        Policy policy
        uint32_t max_conns
        uint32_t queue_depth    # the depth handed with now: one of the two below
        uint32_t full_depth     # with every request fast
        uint32_t slow_depth     # while slow requests are being served
        double slow_seen_at     # when a worker was last seen in a slow request
        double slow_since       # when the spell at the slow depth began; 0: none
        double slow_seconds_total   # in spells at the slow depth that have ended
        uint64_t slow_spells_total
        Slot *slots
        int nslots
        int next_slot           # where a pick starts looking: ties rotate
        FdQueue orphans         # to re-dispatch: their worker never took them
        bint listener_armed
        bint stopping           # close_listener was called: limits do not apply
        uint32_t stop_quota     # connections left to take from the backlog
        double resume_accept_at  # end of an EMFILE pause; 0 when not paused
        bint accept_paused      # from a failed accept to the next success
        int pause_errno
        uint32_t accept_events  # EVENT_ACCEPT_* not yet returned to Python
        bint has_events
        bint any_stuck          # some worker is stuck (see _observe_busy)
        bint any_unread         # some worker has not read handoffs waiting for
                                # it: look again soon, even with nothing to wake us
        bint gate_waiting       # a stop waits for a sibling to leave its
                                # channel (_close_gate): look again soon
        uint64_t accepted_total
        uint64_t redispatched_total
        uint64_t reclaimed_total
        uint64_t stolen_total   # by workers that have exited (see stolen)
        uint64_t lost_total
        int signal_count
        unsigned char signals[MAX_PENDING_SIGNALS]
        HandoffControl reclaim_control
        HandoffMessages *outgoing   # _flush's sendmmsg buffers
        mmsghdr report_headers[MAX_REPORTS_PER_READ]
        iovec report_iovs[MAX_REPORTS_PER_READ]
        ReportMessage reports[MAX_REPORTS_PER_READ]

    def __cinit__(self, int listen_fd=-1, int wake_fd=-1,
                  str policy="least-conn", uint32_t max_conns=1024,
                  uint32_t queue_depth=2, uint32_t slow_queue_depth=0):
        cdef int k
        self.epfd = -1
        self.listen_fd = -1
        self.wake_fd = -1
        self.python_fd = -1
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
        if max_conns < 1:
            raise ValueError("max_conns must be at least 1")
        if queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        if slow_queue_depth > queue_depth:
            raise ValueError("slow_queue_depth must not be above queue_depth")
        self.policy = POLICY_LEAST_CONN if policy == "least-conn" \
            else POLICY_ROUND_ROBIN
        self.max_conns = max_conns
        self.queue_depth = self.full_depth = queue_depth
        # 0: the same depth always.
        self.slow_depth = slow_queue_depth or queue_depth
        memset(&self.orphans, 0, sizeof(FdQueue))
        self.outgoing = <HandoffMessages *>malloc(sizeof(HandoffMessages))
        if self.outgoing == NULL:
            raise MemoryError()
        memset(self.report_headers, 0, sizeof(self.report_headers))
        for k in range(MAX_REPORTS_PER_READ):
            self.report_iovs[k].iov_base = &self.reports[k]
            self.report_iovs[k].iov_len = sizeof(ReportMessage)
            self.report_headers[k].msg_hdr.msg_iov = &self.report_iovs[k]
            self.report_headers[k].msg_hdr.msg_iovlen = 1
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise_errno(errno.errno)
        if wake_fd >= 0:
            self._watch(wake_fd, TAG_WAKE, EPOLLIN)
            self.wake_fd = wake_fd
        if listen_fd >= 0:
            self._watch(listen_fd, TAG_LISTENER, EPOLLIN)
            self.listen_fd = listen_fd
            self.listener_armed = True

    def __dealloc__(self):
        cdef int i
        for i in range(self.nslots):
            self._release_slot(&self.slots[i])
        free(self.slots)
        free(self.outgoing)
        fdq_close_all(&self.orphans)
        if self.listen_fd >= 0:
            close(self.listen_fd)
        if self.epfd >= 0:
            close(self.epfd)

    cdef int _watch(self, int fd, uint64_t tag, uint32_t events) except -1:
        cdef epoll_event event
        event.events = events
        event.data.u64 = tag
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &event) < 0:
            raise_errno(errno.errno)
        return 0

    cdef void _release_slot(self, Slot *s) noexcept:
        if s.channel >= 0:
            close(s.channel)
            s.channel = -1
        if s.peer >= 0:
            close(s.peer)
            s.peer = -1
        if s.load_fd >= 0:
            close(s.load_fd)
            s.load_fd = -1
        close_all(s.batch, s.batch_len)
        s.batch_len = 0
        if s.page != NULL:
            munmap(s.page, LOAD_PAGE_SIZE)
            s.page = NULL

    cdef Slot *_slot(self, int index) except NULL:
        cdef Slot *slots
        cdef int i
        if index < 0:
            raise IndexError(index)
        if index >= self.nslots:
            slots = <Slot *>realloc(self.slots, (index + 1) * sizeof(Slot))
            if slots == NULL:
                raise MemoryError()
            memset(&slots[self.nslots], 0,
                   (index + 1 - self.nslots) * sizeof(Slot))
            for i in range(self.nslots, index + 1):
                slots[i].channel = -1
                slots[i].peer = -1
                slots[i].load_fd = -1
            self.slots = slots
            self.nslots = index + 1
        return &self.slots[index]

    # The supervisor's side: workers come and go.

    def attach(self, int slot, int channel_fd, int load_fd, int peer_fd=-1):
        """Attach a new worker: its channel, its load page, the worker's end.

        `peer_fd` is the worker's end of the channel (the worker has its own
        copy): kept, it is where connections the worker never received are
        taken back from (detach, a stuck worker).  Both fds are owned from
        now on, unless this raises.  The slot gets connections once the
        worker reports ready.
        """
        cdef Slot *s = self._slot(slot)
        cdef LoadPage *page
        cdef int load_copy = -1
        if s.channel >= 0:
            raise ValueError(f"slot {slot} already has a worker")
        page = map_load_page(load_fd)
        try:
            if peer_fd >= 0:
                load_copy = os.dup(load_fd)     # close-on-exec
            self._watch(channel_fd, <uint64_t>slot, EPOLLIN)
        except BaseException:
            munmap(page, LOAD_PAGE_SIZE)
            if load_copy >= 0:
                close(load_copy)
            raise
        s.page = page
        self._write_depth(page)
        atomic_store_u32(&page.max_conns, self.max_conns)
        s.channel = channel_fd
        s.peer = peer_fd
        s.state = SLOT_STARTING
        s.full_until = 0
        s.lost = 0
        s.full_warned_at = 0
        s.congested = False
        s.stop_pending = False
        s.final_pending = False
        s.events = 0
        s.recycle_asked = False
        s.stuck = False
        s.seen_received = 0
        s.seen_at = 0
        s.not_reading = False
        s.last_heard = monotonic()
        s.load_fd = load_copy
        s.handed_total = 0
        s.orphaned = 0
        s.counts_kept = False
        s.batch_len = 0

    def detach(self, int slot):
        """Forget the worker in `slot` (it exited).

        What it never received is taken back from its channel and queued for
        another worker.  Returns how many connections that is.
        """
        cdef uint32_t orphaned
        if not 0 <= slot < self.nslots:
            return 0
        if self.slots[slot].channel >= 0:
            self._read_reports(slot)
            self._close_slot(slot)
        self.slots[slot].last_heard = 0     # nobody left to hear from
        self.slots[slot].counts_kept = False    # folded in by the caller, before
        orphaned = self.slots[slot].orphaned
        self.slots[slot].orphaned = 0
        return orphaned

    def retire(self, int slot):
        """Hand `slot` nothing more, then tell its worker to stop."""
        cdef Slot *s
        if not 0 <= slot < self.nslots or self.slots[slot].channel < 0:
            return
        s = &self.slots[slot]
        s.state = SLOT_RETIRING
        self._flush(slot)
        if s.channel >= 0:
            s.stop_pending = True
            s.final_pending = True
            self._send_stop(slot)

    def close_listener(self):
        """Stop: take in no new connections, hand out what the backlog holds.

        The backlog is the queue the workers share, and with deferred accept
        each connection in it has sent its request: closing the listener
        would reset them.  So from now on every connection goes to a worker
        as soon as one can hold it, past the queue depth and max-conns, and
        to workers that are finishing too.  The listener closes once accept
        finds the backlog empty; when the workers cannot hold everything yet
        (out of descriptors, every one stuck), it stays open and run() goes
        on taking.  Returns how many connections were handed out here.
        """
        cdef int taken = 0, n
        cdef tcp_info info
        cdef socklen_t size = sizeof(info)
        if self.listen_fd >= 0 and not self.stopping:
            # What is queued now reached us before the stop: all of it is
            # served.  What arrives later is refused when the listener
            # closes, so that a steady stream cannot hold the stop open.
            self.stop_quota = 0xFFFFFFFF
            if getsockopt(self.listen_fd, IPPROTO_TCP, TCP_INFO, &info, &size) == 0:
                self.stop_quota = info.tcpi_unacked
        self.stopping = True
        while self.listen_fd >= 0:
            self.resume_accept_at = 0
            n = self._accept_connections(0x7fffffff)
            taken += n
            # Sending closes the primary's copies: descriptors for the next.
            self._settle()
            if n == 0:
                break
        return taken

    def durations(self, int slot):
        """(counts per bucket of DURATION_BOUNDS and one above, sum in seconds)
        of the requests the worker in `slot` has answered."""
        cdef LoadPage *page
        cdef Slot *s
        if not 0 <= slot < self.nslots:
            return [0] * DURATION_BUCKETS, 0.0
        s = &self.slots[slot]
        if s.page == NULL:
            if not s.counts_kept:
                return [0] * DURATION_BUCKETS, 0.0
            return ([s.kept_durations[k] for k in range(DURATION_BUCKETS)],
                    s.kept_duration_sum_us / 1e6)
        page = s.page
        return ([relaxed_load_u64(&page.durations[k]) for k in range(DURATION_BUCKETS)],
                relaxed_load_u64(&page.duration_sum_us) / 1e6)

    def silence(self, int slot):
        """Seconds since the worker in `slot` last reported; 0 for an empty slot.

        A worker reports at least once a second (its heartbeat), so a long
        silence means its event loop is not turning.  A worker whose channel
        closed but which has not been detached (its process lives on, stuck
        at exit) goes on growing silent, so the watchdog still sees it.
        """
        if not 0 <= slot < self.nslots or self.slots[slot].last_heard == 0:
            return 0.0
        return monotonic() - self.slots[slot].last_heard

    def load(self, int slot):
        """(open, queued, in its channel, handed_total) for the worker in `slot`.

        `open` and `queued` include what is in flight.
        """
        cdef Slot *s
        if not 0 <= slot < self.nslots or self.slots[slot].channel < 0:
            return (0, 0, 0, 0)
        s = &self.slots[slot]
        return (atomic_load_u32(&s.page.open) + s.batch_len,
                atomic_load_u32(&s.page.queued) + s.batch_len,
                waiting_in_channel(s.page) + s.batch_len, s.handed_total)

    def lost(self, int slot):
        """Connections the worker in `slot` could not install since last asked."""
        cdef uint32_t lost
        if not 0 <= slot < self.nslots:
            return 0
        lost = self.slots[slot].lost
        self.slots[slot].lost = 0
        return lost

    @property
    def orphans(self):
        """Connections waiting for a worker because theirs went away."""
        return self.orphans.count

    @property
    def accepted(self):
        return self.accepted_total

    @property
    def stolen(self):
        """Connections workers took from their siblings' channels (WorkerChannel.steal)."""
        cdef uint64_t total = self.stolen_total
        cdef int i
        for i in range(self.nslots):
            if self.slots[i].page != NULL:
                total += atomic_load_u32(&self.slots[i].page.stolen)
        return total

    @property
    def redispatched(self):
        """Connections handed a second time: their worker never received them."""
        return self.redispatched_total

    @property
    def reclaimed(self):
        """Connections taken back from a worker's channel (dead or stuck)."""
        return self.reclaimed_total

    @property
    def listening(self):
        return self.listen_fd >= 0

    @property
    def queue_depth(self):
        """The depth handed with now: the slow one while slow requests are served.

        As the next handoff will find it: a second after the last slow
        request, the full one, even if no connection came since to switch.
        """
        if self.slow_since and monotonic() - self.slow_seen_at >= SLOW_MEMORY_SECONDS:
            return self.full_depth
        return self.queue_depth

    @property
    def full_queue_depth(self):
        """The depth handed with while every request is fast."""
        return self.full_depth

    @property
    def slow_queue_depth(self):
        """The depth handed with while slow requests are served (the full one if fixed)."""
        return self.slow_depth

    @property
    def slow_spells(self):
        """How many times the depth went to the slow one."""
        return self.slow_spells_total

    @property
    def slow_seconds(self):
        """Seconds spent at the slow depth, the spell going on included."""
        if not self.slow_since:
            return self.slow_seconds_total
        return self.slow_seconds_total + self._slow_spell_end(monotonic()) - self.slow_since

    def watch_python(self, int fd):
        """Return EVENT_PYTHON_FD from run() while `fd` is readable (level-triggered).

        For work Python does on its own fds (messages between workers): one
        fd, an epoll of Python's own when it has several, so that the loop
        never reads or writes them itself.  Python still owns and closes it.
        """
        if self.python_fd >= 0:
            raise ValueError("the dispatcher watches one fd for Python already")
        self._watch(fd, TAG_PYTHON, EPOLLIN)
        self.python_fd = fd

    # The loop.

    def run(self, double timeout):
        """Serve until Python has something to do, or `timeout` seconds pass.

        Returns a list of (EVENT_*, arg) pairs: the slot for worker events,
        the errno for ACCEPT events, the signal number for EVENT_SIGNAL (one
        per delivery: the wake-up fd carries a byte for each, where Python
        runs a handler once for several), the fd for EVENT_PYTHON_FD.  An
        empty list means the time ran out.
        """
        cdef epoll_event events[MAX_EPOLL_EVENTS]
        cdef double deadline = monotonic() + timeout
        cdef double now, until
        cdef int n, k, wait_ms
        cdef uint64_t tag
        cdef bint listener_ready, polled = False
        while True:
            self._settle()
            now = monotonic()
            if self.resume_accept_at and now >= self.resume_accept_at:
                self.resume_accept_at = 0
            self._arm_listener()
            if self.orphans.count:
                # _arm_listener took some back from a stuck worker: out now,
                # not after the next wake-up.
                self._settle()
            # Look at the fds at least once, even with no time left: a caller
            # that keeps passing 0 must still see reports and connections.
            if self.has_events or (now >= deadline and polled):
                break
            polled = True
            until = deadline
            if self.resume_accept_at and self.resume_accept_at < until:
                until = self.resume_accept_at
            if self.gate_waiting and now + GATE_RECHECK_SECONDS < until:
                until = now + GATE_RECHECK_SECONDS
            if self.any_unread and now + UNREAD_RECHECK_SECONDS < until:
                # A worker frozen with handoffs in its channel (SIGSTOP, a
                # blocked loop) must not hold them until something else
                # wakes us: look again soon and take them back.
                until = now + UNREAD_RECHECK_SECONDS
            wait_ms = 0 if until <= now else <int>((until - now) * 1000.0) + 1
            with nogil:
                n = epoll_wait(self.epfd, events, MAX_EPOLL_EVENTS, wait_ms)
            if n < 0:
                if errno.errno != errno.EINTR:
                    raise_errno(errno.errno)
                # A signal: its byte is on the wake-up fd.  The handler may
                # also have raised (KeyboardInterrupt): Python decides.
                PyErr_CheckSignals()
                continue
            listener_ready = False
            for k in range(n):
                tag = events[k].data.u64
                if tag == TAG_LISTENER:
                    listener_ready = True
                elif tag == TAG_WAKE:
                    self._drain_wake_fd()
                elif tag == TAG_PYTHON:
                    self.python_fd_ready = True
                    self.has_events = True
                else:
                    self._read_reports(<int>tag)
            if listener_ready and self.listen_fd >= 0:
                self._accept_connections(MAX_ACCEPTS_PER_WAKE)
        return self._collect_events()

    cdef int _settle(self) except -1:
        """Re-dispatch orphans, then one sendmsg per worker with a batch."""
        cdef int i
        if self.orphans.count:
            self._observe_busy()
            self._dispatch_orphans()
        self.gate_waiting = False
        for i in range(self.nslots):
            if self.slots[i].batch_len:
                self._flush(i)
            if self.slots[i].stop_pending or self.slots[i].final_pending:
                self._send_stop(i)
        return 0

    cdef int _dispatch_orphans(self) except -1:
        """Orphans first: they are older than anything still in the backlog."""
        cdef int target
        while self.orphans.count:
            target = self._pick()
            if target < 0:
                break
            self.redispatched_total += 1
            self._assign(target, fdq_pop(&self.orphans))
        return 0

    cdef int _pick(self) noexcept:
        """The slot for the next connection, or -1 when no worker can take one.

        least-conn orders workers by the connections they have not answered
        yet, then by those they hold: a worker busy with a slow request
        answers nothing, so its count stays up while a healthy worker's falls
        back to zero within one turn of its loop.  With nothing unanswered
        (keep-alive traffic) this is plain least connections.  Workers that
        _observe_busy last marked stuck get nothing, and no worker gets more
        connections than it has descriptors for.
        """
        cdef int best = -1, i, k
        cdef uint32_t load, unread, depth, room
        cdef double now
        cdef uint64_t rank, best_rank = 0xFFFFFFFFFFFFFFFF
        cdef Slot *s
        for k in range(self.nslots):
            i = self.next_slot + k
            if i >= self.nslots:
                i -= self.nslots
            s = &self.slots[i]
            if s.congested or s.stuck:
                continue
            if s.state != SLOT_ACTIVE and not (
                    self.stopping and s.state == SLOT_RETIRING):
                continue
            unread = atomic_load_u32(&s.page.queued) + s.batch_len
            load = atomic_load_u32(&s.page.open) + s.batch_len
            room = atomic_load_u32(&s.page.fd_room)
            if room and load >= room:
                # The kernel would close what it cannot install.  Said at
                # most once every FULL_WARNING_SECONDS while it lasts.
                now = monotonic()
                if s.full_warned_at == 0 or now - s.full_warned_at >= FULL_WARNING_SECONDS:
                    s.full_warned_at = now
                    s.events |= EVENT_WORKER_FULL
                    self.has_events = True
                continue
            if not self.stopping:
                depth = self.queue_depth * (
                    STUCK_DEPTH_FACTOR if self.any_stuck else CHANNEL_AHEAD_FACTOR)
                if unread >= depth:
                    continue    # it has not caught up: keep this in the backlog
                if load >= self.max_conns:
                    continue
            if s.full_until != 0 and load >= s.full_at:
                if monotonic() < s.full_until:
                    continue
                s.full_until = 0
            if self.policy == POLICY_ROUND_ROBIN:
                return i
            rank = (<uint64_t>unread << 32) | load
            if rank < best_rank:
                best = i
                best_rank = rank
        return best

    cdef int _observe_busy(self) except -1:
        """Mark the workers stuck in a slow request, for the picks that follow.

        A worker that has been in one request for a while is busy with slow
        work, and whatever it is handed waits for that: _pick gives it nothing
        (it nudges when it leaves the request, see WorkerChannel.end), what
        waits in its channel is taken back for the others (a full thread
        pool's only while another worker is free: pool_full), and meanwhile the
        others may queue more, so that they take the load in fewer, bigger
        batches.  Looked at once per batch of picks, not per connection:
        within one wake-up it does not change in a way that matters.
        """
        cdef uint32_t since, received, waiting, now = 0
        cdef int i
        cdef bint slow = False
        cdef int free_workers = 0
        cdef bint pool_kept = False     # a full pool kept what waits for it
        cdef Slot *s
        self.any_stuck = False
        self.any_unread = False
        for i in range(self.nslots):
            s = &self.slots[i]
            s.stuck = False
            s.pool_full = False
            if s.page == NULL:
                continue
            if s.congested and waiting_in_channel(s.page) < s.congested_at:
                s.congested = False     # it has read from its channel since
            if atomic_load_u32(&s.page.reintroduce):
                atomic_store_u32(&s.page.reintroduce, 0)
                if s.state == SLOT_ACTIVE:
                    self._introduce(i, False)
            if s.state != SLOT_ACTIVE:
                continue
            since = atomic_load_u32(&s.page.busy_since)
            if since:
                if not now:
                    now = clock_us()
                # Unsigned difference: wraps correctly; a stamp a hair newer
                # than `now` gives a huge value, read as not stuck.
                if STUCK_MICROSECONDS < now - since < 0x80000000:
                    s.stuck = True
                    if now - since > SLOW_REQUEST_MICROSECONDS:
                        slow = True
                    s.pool_full = pool_full(s.page, now - since)
            # A worker that takes nothing off its channel for as long, with
            # handoffs waiting there and room in hand for them, is as stuck
            # (frozen, swapped out): what waits goes to a worker that reads.
            # With its hand full it is busy with what it holds, and says so
            # by its stamp if that is slow work.
            received = atomic_load_u32(&s.page.received)
            waiting = waiting_in_channel(s.page)
            if self.stopping:
                # Everything goes to the finishing workers and stays there.
                s.seen_at = 0
                s.not_reading = False
            elif received != s.seen_received:
                s.seen_received = received
                s.seen_at = 0
                s.not_reading = False
            elif (waiting == 0 or s.not_reading
                    or atomic_load_u32(&s.page.queued) - waiting >= self.queue_depth):
                s.seen_at = 0
            else:
                if not now:
                    now = clock_us()
                if s.seen_at == 0:
                    s.seen_at = now
                elif (NOT_READING_MICROSECONDS < now - s.seen_at < 0x80000000
                        and self._close_gate(s)):
                    # Until it reads or reports: given nothing meanwhile,
                    # not handed back what was just taken from it.  Nudged
                    # before the take-back, so that a worker that was only
                    # slow to run finds the nudge set when it reads, and
                    # reports at once (WorkerChannel.receive).  Its gate
                    # stays closed meanwhile: the wake-up sent below is for
                    # it, not for a sibling passing by.
                    s.not_reading = True
                    atomic_store_u32(&s.page.nudge, 1)
                self.any_unread = True
            if s.not_reading:
                s.stuck = True
            elif (not self.stopping
                    and atomic_load_u32(&s.page.steal_gate) == STEAL_CLOSED):
                # Serving: siblings may take what waits for it if it gets
                # stuck.  Only the primary moves the gate from closed.
                atomic_store_u32(&s.page.steal_gate, STEAL_OPEN)
            if s.stuck:
                self.any_stuck = True
                if s.pool_full and not s.not_reading:
                    pool_kept = pool_kept or waiting_in_channel(s.page) != 0
                elif waiting_in_channel(s.page) and self._reclaim(s) and s.not_reading:
                    # A worker that was only slow to run may have found the
                    # channel readable and then, once it ran, empty: it
                    # sleeps without reading the nudge, and is given nothing
                    # until its next heartbeat (a second).  Seen under the
                    # skew workload: one worker idle for up to a second at
                    # a time, the other carrying every slow request alone.
                    # This message makes the channel readable again.  A
                    # worker frozen for good leaves it unread; a later
                    # take-back drops it with the handoffs and sends another.
                    send_command(s.channel, COMMAND_WAKE)
            elif not s.congested and not atomic_load_u32(&s.page.busy_pool):
                # A pool that filled under STUCK_MICROSECONDS ago is not stuck
                # yet, but it is no freer than the one it would take from.
                free_workers += 1
        if pool_kept and free_workers:
            # What waits for a full pool goes to a worker that can start it
            # now.  With every worker busy it stays: taken back, it would go
            # to the first pool with a free thread, no sooner than its own,
            # and back again when that one filled.  Measured with 4 workers
            # of 4 threads on 2 CPUs, every request waiting 5 ms: each
            # connection was handed twice, at 27-32 µs of the primary's CPU
            # per request; now 1.1-1.2 times, at 22-24 µs, and p99 45 ms
            # against 47-51 (bench/RESULTS.md, "A WSGI pool").
            for i in range(self.nslots):
                s = &self.slots[i]
                if (s.pool_full and not s.not_reading and s.page != NULL
                        and waiting_in_channel(s.page)):
                    self._reclaim(s)
        if self.slow_depth != self.full_depth:
            self._adapt_depth(slow)
        return 0

    cdef int _adapt_depth(self, bint slow) except -1:
        """Hand with the slow depth while slow requests are being served.

        Workers that take turns on a CPU serve more at a time in deeper
        batches (fewer rounds of context switches), but whatever one holds
        in hand when it meets a slow request waits for the whole request,
        on a CPU it shares.  With wrk on CPU 0 and 2 workers on CPU 1
        (bench/RESULTS.md, "Then and now"): at a fixed depth of 4, `skew`
        p99 was 1.22x-1.32x a shared socket's over 8 runs; at a fixed 2,
        0.95x, but `close` throughput fell to 0.74x a shared socket's.
        Slow requests come and go with what an app is asked, so the depth
        follows them: the slow one from the first seen, the full one back a
        second (SLOW_MEMORY_SECONDS) after the last.  Over 4 runs that gave
        `skew` p99 at 0.90x-1.16x a shared socket's and `close` as at 4.

        A WSGI worker stamps its page while every thread of its pool is
        busy (WorkerChannel.hold_busy): a pool busy for as long counts as a
        slow request, since what the worker holds waits as long, for a
        thread, even if the pool finishes requests meanwhile.
        """
        cdef double now
        cdef uint32_t depth
        cdef int i
        if not slow and not self.slow_since:
            return 0    # the usual case: no clock read
        now = monotonic()
        if self.slow_since and now - self.slow_seen_at >= SLOW_MEMORY_SECONDS:
            # The spell ended a second after its last sighting, whether or
            # not a handoff came since to see it end.
            self.slow_seconds_total += self._slow_spell_end(now) - self.slow_since
            self.slow_since = 0
        if slow:
            self.slow_seen_at = now
            if not self.slow_since:
                self.slow_since = now
                self.slow_spells_total += 1
        depth = self.slow_depth if self.slow_since else self.full_depth
        if depth == self.queue_depth:
            return 0
        self.queue_depth = depth
        for i in range(self.nslots):
            if self.slots[i].page != NULL:
                self._write_depth(self.slots[i].page)
                # A worker whose hand was full at the old depth stopped
                # reading its channel; it has room now, but reads again only
                # once it reaches a connection: not a worker that has stopped
                # reading (_observe_busy), so its clock starts afresh.
                self.slots[i].seen_at = 0
        return 0

    cdef inline double _slow_spell_end(self, double now) noexcept:
        """When the spell at the slow depth ends, if no slow request comes.

        The depth goes back only when the primary next hands a connection:
        a spell that met no traffic after its second ended with the second.
        """
        return min(now, self.slow_seen_at + SLOW_MEMORY_SECONDS)

    cdef inline void _write_depth(self, LoadPage *page) noexcept:
        """What a worker reads of the depth: its hand, and when to nudge."""
        atomic_store_u32(&page.hand_limit, self.queue_depth)
        atomic_store_u32(&page.nudge_below, self.queue_depth * CHANNEL_AHEAD_FACTOR // 2)

    cdef inline int _assign(self, int i, int fd) except -1:
        cdef Slot *s = &self.slots[i]
        s.batch[s.batch_len] = fd
        s.batch_len += 1
        self.next_slot = i + 1 if i + 1 < self.nslots else 0
        if s.batch_len == MAX_FDS_PER_MESSAGE:
            self._flush(i)
        return 0

    cdef int _accept_connections(self, int limit) except -1:
        cdef int accepted = 0, fd, target, err
        self._observe_busy()
        self._dispatch_orphans()
        while accepted < limit:
            if self.stopping and self.stop_quota == 0:
                self._close_listener()  # all that was queued at the stop
                break
            target = self._pick()
            if target < 0:
                break   # every worker is full: the backlog holds the rest
            fd = accept4(self.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno.errno
                if err == errno.EAGAIN:
                    if self.stopping:
                        self._close_listener()  # the backlog is empty
                    break
                if (err == errno.EINTR or err == errno.ECONNABORTED
                        or err == errno.EPERM or err == errno.EPROTO
                        or err == errno.ENETDOWN or err == errno.ENOPROTOOPT
                        or err == errno.EHOSTDOWN or err == errno.ENONET
                        or err == errno.EHOSTUNREACH or err == errno.EOPNOTSUPP
                        or err == errno.ENETUNREACH):
                    # The pending connection failed (aborted by the client,
                    # refused by a firewall, a network error accept(2) passes
                    # through); the listener is fine, take the next one.
                    continue
                if (err == errno.EMFILE or err == errno.ENFILE
                        or err == errno.ENOBUFS or err == errno.ENOMEM):
                    self._pause_accepting(err)
                    break
                raise_errno(err)
            if self.accept_paused:
                self.accept_paused = False
                self.accept_events |= EVENT_ACCEPT_RESUMED
                self.has_events = True
            self.accepted_total += 1
            self._assign(target, fd)
            accepted += 1
            if self.stopping:
                self.stop_quota -= 1
                if self.stop_quota == 0:
                    self._close_listener()  # all that was queued at the stop
                    break
        return accepted

    cdef void _close_listener(self) noexcept:
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.listen_fd, NULL)
        close(self.listen_fd)
        self.listen_fd = -1
        self.listener_armed = False

    cdef void _pause_accepting(self, int err) noexcept:
        # Retrying at once would spin: nothing frees a descriptor until some
        # connection closes.  The connections wait in the kernel backlog.
        self.resume_accept_at = monotonic() + ACCEPT_PAUSE_SECONDS
        if not self.accept_paused:   # said once a pause, however long
            self.accept_paused = True
            self.accept_events |= EVENT_ACCEPT_PAUSED
            self.pause_errno = err
            self.has_events = True

    cdef int _arm_listener(self) except -1:
        """Watch the listener only while some worker can take a connection."""
        cdef bint want = False
        cdef epoll_event event
        cdef int i
        if self.listen_fd < 0:
            return 0
        if self.resume_accept_at == 0:
            self._observe_busy()
            want = self._pick() >= 0
            if not want:
                # Ask every worker to say when it has room, then look once
                # more: a worker that made room in between is seen here, any
                # later one sends the nudge (see LoadPage).
                for i in range(self.nslots):
                    if self.slots[i].page != NULL:
                        atomic_store_u32(&self.slots[i].page.nudge, 1)
                self._observe_busy()
                want = self._pick() >= 0
        if want != self.listener_armed:
            event.events = EPOLLIN if want else 0
            event.data.u64 = TAG_LISTENER
            if epoll_ctl(self.epfd, EPOLL_CTL_MOD, self.listen_fd, &event) < 0:
                raise_errno(errno.errno)
            self.listener_armed = want
        return 0

    cdef int _flush(self, int i) except -1:
        cdef Slot *s = &self.slots[i]
        cdef int k, err, sent, count = s.batch_len
        if count == 0:
            return 0
        # Counted before the send, so the worker never counts one out first.
        atomic_add_u32(&s.page.open, count)
        atomic_add_u32(&s.page.queued, count)
        sent = send_handoffs(s.channel, s.batch, count, self.outgoing)
        err = -sent if sent < 0 else errno.EAGAIN
        if sent > 0:
            # The worker's copy is the only one now (see the top).
            close_all(s.batch, sent)
            atomic_add_u32(&s.page.sent, sent)
            s.handed_total += sent
            if sent == count:
                s.batch_len = 0
                return 0
        else:
            sent = 0
        atomic_sub_u32(&s.page.open, count - sent)
        atomic_sub_u32(&s.page.queued, count - sent)
        # Not sent, so never seen by the worker: another can have them.
        for k in range(sent, count):
            fdq_push(&self.orphans, s.batch[k])
        s.batch_len = 0
        if (err == errno.EAGAIN or err == errno.ENOBUFS or err == errno.ENOMEM
                or err == errno.ETOOMANYREFS):
            # Its channel is full (it is not reading) or the kernel's limit
            # on fds in flight is reached; try it again once it has read.
            s.congested = True
            s.congested_at = waiting_in_channel(s.page)
        else:
            self._close_slot(i)     # broken; its exit tells the supervisor
        return 0

    cdef int _send_stop(self, int i) except -1:
        """COMMAND_STOP, then COMMAND_FINAL once nothing more will follow.

        Stopping, the backlog and the orphans still go to the finishing
        workers: a worker that held nothing for a moment must not exit while
        there is more for it.  Retried by every _settle until sent.
        """
        cdef Slot *s = &self.slots[i]
        cdef int err
        if s.batch_len:
            return 0    # the batch goes first
        if not self._close_gate(s):
            return 0    # a sibling is taking from its channel: a moment
        if s.stop_pending:
            err = send_command(s.channel, COMMAND_STOP)
            if err == errno.EAGAIN or err == errno.ENOBUFS:
                return 0
            s.stop_pending = False  # sent, or the worker is gone
        if s.final_pending:
            if self.stopping and (self.listen_fd >= 0 or self.orphans.count):
                return 0
            err = send_command(s.channel, COMMAND_FINAL)
            if err == errno.EAGAIN or err == errno.ENOBUFS:
                return 0
            s.final_pending = False
        return 0

    cdef bint _close_gate(self, Slot *s) noexcept:
        """Keep siblings out of the worker's channel: True once they are.

        Before a message meant for the worker alone (a stop, a wake-up).
        False while a sibling is taking from it; the caller tries again
        (gate_waiting brings the loop back soon).  It opens again only once
        the worker serves and reads (_observe_busy).
        """
        if atomic_cas_u32(&s.page.steal_gate, STEAL_OPEN, STEAL_CLOSED):
            return True
        if atomic_load_u32(&s.page.steal_gate) == STEAL_CLOSED:
            return True
        self.gate_waiting = True
        return False

    cdef void _introduce(self, int i, bint to_siblings=True) noexcept:
        """Worker i now serves: it and its serving siblings learn of each other.

        Each gets the other's channel end and load page (COMMAND_SIBLING),
        so that a worker with time to spare can take, from a sibling stuck
        in a slow request, the handoffs waiting in its channel: at once, where
        the primary, sharing a CPU with the busy ones, sees it only when it
        next runs (see WorkerChannel.steal).  Best effort: a channel with no
        room for the message goes without, and loses only the shortcut.
        `to_siblings` False: only i hears of them again.
        """
        cdef Slot *s = &self.slots[i]
        cdef Slot *other
        cdef int fds[2]
        cdef int j
        if s.peer < 0 or s.load_fd < 0:
            return      # a baseline mode: workers accept for themselves
        for j in range(self.nslots):
            other = &self.slots[j]
            if j == i or other.peer < 0 or other.load_fd < 0:
                continue
            if other.state != SLOT_ACTIVE:
                continue    # one starting learns of i when it serves
            if to_siblings:
                fds[0] = s.peer
                fds[1] = s.load_fd
                send_handoff(other.channel, fds, 2,
                             COMMAND_SIBLING | (<uint32_t>i << COMMAND_SLOT_SHIFT))
            fds[0] = other.peer
            fds[1] = other.load_fd
            send_handoff(s.channel, fds, 2,
                         COMMAND_SIBLING | (<uint32_t>j << COMMAND_SLOT_SHIFT))

    cdef uint32_t _reclaim(self, Slot *s, bint worker_alive=True) except? 0xFFFFFFFF:
        """Take back what waits in the worker's end of its channel.

        Each message goes either to the worker or to us, whole, so nothing
        is served twice.  From a live worker, a message is taken only while
        this process has a descriptor free for it (the kernel would close a
        connection it cannot install: better left for the worker).  Returns
        how many connections came back.
        """
        cdef CommandMessage command
        cdef int *fds = NULL
        cdef uint32_t installed, k, taken = 0
        cdef ssize_t received
        cdef int spare
        if s.peer < 0:
            return 0
        while True:
            if worker_alive:
                # Handoffs are one connection a message: one free
                # descriptor is room enough.
                spare = dup(self.epfd)
                if spare < 0:
                    break
                close(spare)
            received = receive_command(s.peer, &command, &self.reclaim_control,
                                       &fds, &installed)
            if received <= 0:
                break   # EAGAIN: nothing more waits
            if command.command != COMMAND_HANDOFF:
                # A wake-up sent again if need be; a stop the worker will
                # not read now; an introduction, sent again as when a
                # sibling takes one (reintroduce, _observe_busy).
                close_all(fds, installed)
                if worker_alive and (command.command & COMMAND_MASK) == COMMAND_SIBLING:
                    atomic_store_u32(&s.page.reintroduce, 1)
                continue
            for k in range(installed):
                fdq_push(&self.orphans, fds[k])
            atomic_add_u32(&s.page.reclaimed, command.count)
            atomic_sub_u32(&s.page.open, command.count)
            atomic_sub_u32(&s.page.queued, command.count)
            # Beyond `installed`: the primary itself is out of descriptors.
            self.lost_total += command.count - installed
            taken += installed
        self.reclaimed_total += taken
        return taken

    cdef int _read_reports(self, int i) except -1:
        cdef Slot *s = &self.slots[i]
        cdef int n, k
        while s.channel >= 0:
            n = recvmmsg(s.channel, self.report_headers, MAX_REPORTS_PER_READ,
                         MSG_DONTWAIT, NULL)
            if n < 0:
                if errno.errno == errno.EINTR:
                    continue
                return 0    # EAGAIN
            for k in range(n):
                if self.report_headers[k].msg_len == 0:
                    # The end of the stream: the worker's end is closed in
                    # every process (the baseline modes keep no copy).  Its
                    # exit tells the supervisor; stop watching now.
                    self._close_slot(i)
                    return 0
                if self.report_headers[k].msg_len == sizeof(ReportMessage):
                    self._apply_report(s, &self.reports[k])
            if n < MAX_REPORTS_PER_READ:
                return 0
        return 0

    cdef int _apply_report(self, Slot *s, ReportMessage *report) except -1:
        s.congested = False     # its loop turns: try its channel again
        s.not_reading = False
        s.last_heard = monotonic()
        if report.lost:
            # The kernel closed what the worker had no descriptor for.
            s.lost += report.lost
            self.lost_total += report.lost
            s.events |= EVENT_WORKER_FULL
            self.has_events = True
            s.full_at = atomic_load_u32(&s.page.open)
            s.full_until = monotonic() + WORKER_FULL_SECONDS
        if report.state == WORKER_READY and s.state == SLOT_STARTING:
            s.state = SLOT_ACTIVE
            s.events |= EVENT_READY
            self.has_events = True
            self._introduce(<int>(s - self.slots))
        elif report.state == WORKER_DRAINING and (
                s.state == SLOT_STARTING or s.state == SLOT_ACTIVE):
            s.state = SLOT_RETIRING
            s.events |= EVENT_DRAINING
            self.has_events = True
        elif report.state == WORKER_RECYCLE and not s.recycle_asked:
            s.recycle_asked = True
            s.events |= EVENT_RECYCLE
            self.has_events = True
        return 0

    cdef uint32_t _close_slot(self, int i) except? 0xFFFFFFFF:
        """The worker in slot i is gone: queue what it never took for others."""
        cdef Slot *s = &self.slots[i]
        cdef uint32_t orphaned = s.batch_len
        cdef int k
        if s.channel < 0:
            return 0
        for k in range(s.batch_len):
            fdq_push(&self.orphans, s.batch[k])
        s.batch_len = 0
        # Siblings must not look in its channel from here on (the gate),
        # and may let their copies of it go (the empty introduction).
        atomic_store_u32(&s.page.steal_gate, STEAL_CLOSED)
        if s.peer >= 0:
            for k in range(self.nslots):
                if k != i and self.slots[k].channel >= 0 and self.slots[k].peer >= 0:
                    send_command(self.slots[k].channel,
                                 COMMAND_SIBLING | (<uint32_t>i << COMMAND_SLOT_SHIFT))
        self.stolen_total += atomic_load_u32(&s.page.stolen)
        orphaned += self._reclaim(s, False)
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, s.channel, NULL)
        close(s.channel)
        s.channel = -1
        if s.peer >= 0:
            close(s.peer)
            s.peer = -1
        if s.load_fd >= 0:
            close(s.load_fd)
            s.load_fd = -1
        if s.page != NULL:
            # A worker closes its channel before it exits, and outside
            # dispatch mode the primary holds no copy of its end: the close
            # comes here before the exit, whose fold needs the counts.
            for k in range(DURATION_BUCKETS):
                s.kept_durations[k] = relaxed_load_u64(&s.page.durations[k])
            s.kept_duration_sum_us = relaxed_load_u64(&s.page.duration_sum_us)
            s.counts_kept = True
            munmap(s.page, LOAD_PAGE_SIZE)
            s.page = NULL
        s.state = SLOT_EMPTY
        s.stop_pending = False
        s.final_pending = False
        s.congested = False
        s.stuck = False
        s.orphaned = orphaned
        return orphaned

    cdef void _drain_wake_fd(self) noexcept:
        cdef unsigned char buffer[64]
        cdef ssize_t n, k
        while True:
            n = read(self.wake_fd, buffer, sizeof(buffer))
            if n <= 0:
                return
            for k in range(n):
                if buffer[k] and self.signal_count < MAX_PENDING_SIGNALS:
                    self.signals[self.signal_count] = buffer[k]
                    self.signal_count += 1
                    self.has_events = True

    cdef list _collect_events(self):
        cdef list events = []
        cdef int i
        cdef uint32_t bit
        if not self.has_events:
            return events
        for i in range(self.nslots):
            for bit in (EVENT_READY, EVENT_DRAINING, EVENT_WORKER_FULL,
                        EVENT_RECYCLE):
                if self.slots[i].events & bit:
                    events.append((bit, i))
            self.slots[i].events = 0
        for bit in (EVENT_ACCEPT_PAUSED, EVENT_ACCEPT_RESUMED):
            if self.accept_events & bit:
                events.append((bit, self.pause_errno))
        self.accept_events = 0
        if self.python_fd_ready:
            events.append((EVENT_PYTHON_FD, self.python_fd))
            self.python_fd_ready = False
        for i in range(self.signal_count):
            events.append((EVENT_SIGNAL, self.signals[i]))
        self.signal_count = 0
        self.has_events = False
        return events


# What a worker knows of its siblings.

@cython.final
cdef class SiblingChannels:
    """The serving siblings a worker knows of, by slot (COMMAND_SIBLING).

    For each, the worker's end of its channel (-1: none), where handoffs it
    has not received wait, and its load page, which says whether it is inside
    a request, how many wait, and whether a sibling may take them (the
    gate).  What to take is decided here (takeable); taking it, with this
    worker's own counts, is WorkerChannel.steal's.
    """

    cdef:
        int *channels
        LoadPage **pages
        int count       # slots 0 .. count-1 have an entry (maybe empty)

    def __dealloc__(self):
        cdef int k
        for k in range(self.count):
            self.forget(k)
        free(self.channels)
        free(self.pages)

    cdef bint learn(self, uint32_t slot, int *fds, uint32_t installed) noexcept:
        """Keep a sibling's channel end and map its load page: True if the slot was empty.

        Replaces what was kept for the slot's previous worker.  Without room
        for it (no descriptor, no memory) the sibling is only not known:
        stealing is a shortcut the primary's take-back also covers.
        """
        cdef void *page
        cdef int *channels
        cdef LoadPage **pages
        cdef int k
        cdef bint new
        if installed != 2 or slot >= 0x10000:
            close_all(fds, installed)
            return False
        page = mmap(NULL, LOAD_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fds[1], 0)
        close(fds[1])
        if page == MAP_FAILED:
            close(fds[0])
            return False
        if <int>slot >= self.count:
            channels = <int *>realloc(self.channels, (slot + 1) * sizeof(int))
            if channels != NULL:
                self.channels = channels
            pages = <LoadPage **>realloc(self.pages, (slot + 1) * sizeof(LoadPage *))
            if pages != NULL:
                self.pages = pages
            if channels == NULL or pages == NULL:
                close(fds[0])
                munmap(page, LOAD_PAGE_SIZE)
                return False
            for k in range(self.count, slot + 1):
                self.channels[k] = -1
                self.pages[k] = NULL
            self.count = slot + 1
        new = self.channels[slot] < 0
        self.forget(slot)
        self.channels[slot] = fds[0]
        self.pages[slot] = <LoadPage *>page
        return new

    cdef bint drop(self, uint32_t slot) noexcept:
        """The sibling in `slot` is gone: let its channel end and page go.

        True if one was kept.  Until then its closed gate keeps this worker
        out; this gives back the descriptor and the mapping.
        """
        if <int>slot >= self.count or self.channels[slot] < 0:
            return False
        self.forget(slot)
        return True

    cdef void forget(self, int slot) noexcept:
        if self.channels[slot] >= 0:
            close(self.channels[slot])
            self.channels[slot] = -1
        if self.pages[slot] != NULL:
            munmap(self.pages[slot], LOAD_PAGE_SIZE)
            self.pages[slot] = NULL

    cdef uint32_t takeable(self, int slot, uint32_t *now, bint idle) noexcept:
        """How many handoffs to take from the sibling's channel (0xFFFFFFFF: all).

        All, from a sibling inside one request for over STUCK_MICROSECONDS:
        they would wait for all of it.  Half, from one with two or more
        waiting, when this worker is `idle`: it would sleep while they wait,
        as a free worker on a shared socket would not (measured under the
        close workload, bench/RESULTS.md: p99 1.20x a shared socket's
        without this, 1.02x with it).  Only while its gate is open; steal()
        takes no more than the room in hand (_room_in_hand).  `now` is the
        clock, read once for all siblings when first needed.
        """
        cdef LoadPage *page = self.pages[slot]
        cdef uint32_t since, waiting
        if page == NULL:
            return 0
        waiting = waiting_in_channel(page)
        if waiting == 0:
            return 0
        if atomic_load_u32(&page.steal_gate) != STEAL_OPEN:
            return 0
        since = atomic_load_u32(&page.busy_since)
        if since:
            if not now[0]:
                now[0] = clock_us()
            if STUCK_MICROSECONDS < now[0] - since < 0x80000000:
                return 0xFFFFFFFF
        if idle and waiting >= 2:
            return waiting // 2
        return 0


# The worker's end.

@cython.final
cdef class WorkerChannel:
    """A worker's end of its channel: receives handoffs, reports back.

    Owns the channel fd and the worker's side of the load page: its counts of
    open and queued (first request not yet answered) connections, and whether
    it is inside a request.
    """

    cdef:
        int fd
        LoadPage *page
        LoadPage local_page     # stands in for the shared one when there is none
        bint mapped
        uint32_t state
        bint report_waiting     # a report the primary's socket had no room for
        uint32_t lost           # handed connections not installed, to report
        uint64_t lost_total
        HandoffControl control
        bint busy_held          # hold_busy(): begin/end leave the stamp alone
        uint32_t request_mark   # when the request being answered began (observe_since_begin)
        uint32_t in_hand        # received, not reached yet (see hand_full)
        SiblingChannels siblings_known
        uint32_t sibling_fds_charged    # taken off fd_room for siblings' channel ends

    def __cinit__(self, int fd, int load_fd=-1):
        self.fd = -1
        self.page = &self.local_page
        if load_fd >= 0:
            self.page = map_load_page(load_fd)
            self.mapped = True
        self.fd = fd
        self.state = WORKER_STARTING
        self.siblings_known = SiblingChannels()

    def __dealloc__(self):
        if self.mapped:
            munmap(self.page, LOAD_PAGE_SIZE)
        if self.fd >= 0:
            close(self.fd)

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    @property
    def open_connections(self):
        """Connections handed to this worker and not closed, in flight included."""
        return atomic_load_u32(&self.page.open)

    @property
    def queued(self):
        """Handed connections whose first request is not answered yet."""
        return atomic_load_u32(&self.page.queued)

    @property
    def lost(self):
        """Handed connections the kernel closed: no descriptor was free for them."""
        return self.lost_total

    @property
    def fd_room(self):
        """How many connections the primary may hand this worker (0: no limit known)."""
        return atomic_load_u32(&self.page.fd_room)

    def set_fd_room(self, uint32_t room):
        """How many connections this worker has descriptors for (0: unknown).

        The primary hands it no more than that: what does not fit in a
        process is closed by the kernel on receipt.
        """
        atomic_store_u32(&self.page.fd_room, room)

    def observe(self, double seconds):
        """A request was answered in `seconds`: count it in the duration histogram."""
        self._observe(<uint64_t>(seconds * 1e6) if seconds > 0 else 0)

    def observe_since_begin(self):
        """A request was answered within this callback: count its time.

        That is the time since begin(), or, for a request pipelined behind
        another in the same read, since the one before it was answered: its
        time is its own, not the sum of those answered ahead of it.
        """
        cdef uint32_t now = clock_us()
        cdef uint32_t since = self.request_mark
        self.request_mark = now
        self._observe(<uint32_t>(now - since) if since else 0)

    cdef void _observe(self, uint64_t micros) noexcept:
        # Most requests fall in the first few buckets: a scan from the
        # bottom ends sooner than a binary search would.
        cdef int k = 0
        while k < DURATION_BUCKETS - 1 and micros > DURATION_BOUNDS_US[k]:
            k += 1
        relaxed_store_u64(&self.page.durations[k], self.page.durations[k] + 1)
        relaxed_store_u64(&self.page.duration_sum_us, self.page.duration_sum_us + micros)

    def opened(self):
        """A connection this worker accepted itself (the baseline modes)."""
        atomic_add_u32(&self.page.open, 1)

    def closed(self):
        """A connection ended."""
        atomic_sub_u32(&self.page.open, 1)
        self._nudge_if_asked()

    def begin(self):
        """The worker enters a request's callbacks (see LoadPage.busy_since)."""
        self._begin()

    def end(self):
        """...and leaves them: the primary may be waiting for that."""
        self._end()

    def hold_busy(self, bint held):
        """Read as busy until released, whatever begin() and end() say meanwhile.

        For work that does not block the event loop but fills the worker all
        the same: a WSGI app with every thread of its pool taken.
        """
        self.busy_held = held
        if held:
            # The pool's mark first: whoever sees the stamp sees whose it is.
            atomic_store_u32(&self.page.busy_pool, 1)
            atomic_store_u32(&self.page.busy_since, clock_us())
        else:
            self._end()
            atomic_store_u32(&self.page.busy_pool, 0)

    def stamped(self, coro):
        """`coro`, driven step by step with begin() and end() around each step.

        Awaiting it instead of `coro` marks the worker busy while the app's
        code runs, and only then: not while it waits.
        """
        return StampedSteps(coro, self)

    def dequeue(self):
        """The worker reached a handed connection's request (or it is gone): off the queue."""
        atomic_sub_u32(&self.page.queued, 1)
        if self.in_hand:
            self.in_hand -= 1
        self._nudge_if_asked()

    @property
    def hand_full(self):
        """True while the worker holds as many unreached connections as it may.

        It then leaves the rest in its channel, where the primary can take
        them back for another worker if this one gets stuck in a slow
        request, until it reaches one of those it holds (dequeue).
        """
        cdef uint32_t limit = atomic_load_u32(&self.page.hand_limit)
        return limit != 0 and self.in_hand >= limit

    cdef inline void _begin(self) noexcept:
        cdef uint32_t now = clock_us()
        self.request_mark = now
        if not self.busy_held:
            atomic_store_u32(&self.page.busy_since, now)

    cdef inline void _end(self) noexcept:
        if not self.busy_held:
            atomic_store_u32(&self.page.busy_since, 0)
            self._nudge_if_asked()

    cdef void _nudge_if_asked(self) noexcept:
        # The primary waits for room here (see LoadPage): wake it, once the
        # queue is down to nudge_below.  Above that the worker has work in
        # hand and every connection it reaches comes back here, so the nudge
        # is only put off, and the primary hands a batch when it comes.
        cdef uint32_t below
        if atomic_load_u32(&self.page.nudge):
            below = atomic_load_u32(&self.page.nudge_below)
            if below and atomic_load_u32(&self.page.queued) > below:
                return
            if atomic_exchange_u32(&self.page.nudge, 0):
                self.report_waiting = True
                self._send_waiting()

    @property
    def backlogged(self):
        """True while a report waits for room in the primary's socket."""
        return self.report_waiting

    def receive(self, bint within_hand=False):
        """Take what the primary has queued: (fds, stop, final, closed).

        `fds` are the connections to serve, in order; the primary counted
        them as this worker's open and queued connections when it sent them
        (see dequeue and closed).  `within_hand`: stop once the hand is full
        (hand_full), leaving the rest in the channel, commands behind it
        included; the worker's loop reads that way.  `stop` is True when the primary asked this
        worker to finish what it holds, `final` when it said nothing more
        will come (exit once idle), `closed` when the channel reached its end
        (the primary is gone).
        """
        cdef CommandMessage command
        cdef ssize_t received
        cdef int *data = NULL
        cdef uint32_t installed, k, lost
        cdef list fds = []
        cdef bint stop = False, final = False, closed = False
        cdef uint32_t limit = atomic_load_u32(&self.page.hand_limit) if within_hand else 0
        while self.fd >= 0:
            if limit and self.in_hand >= limit:
                break
            received = receive_command(self.fd, &command, &self.control,
                                       &data, &installed)
            if received < 0:
                if errno.errno == errno.EAGAIN:
                    break
                if errno.errno == errno.ECONNRESET:
                    closed = True
                    break
                raise_errno(errno.errno)
            if received == 0:
                closed = True
                break
            if command.command == COMMAND_HANDOFF:
                for k in range(installed):
                    fds.append(data[k])
                self.in_hand += installed
                atomic_add_u32(&self.page.received, command.count)
                if installed < command.count:
                    # Out of descriptors: the kernel closed the rest.  They
                    # were counted as ours; the primary must hear of it.
                    lost = command.count - installed
                    atomic_sub_u32(&self.page.open, lost)
                    atomic_sub_u32(&self.page.queued, lost)
                    self.lost += lost
                    self.lost_total += lost
                    self.report_waiting = True
            elif command.command == COMMAND_STOP:
                stop = True
            elif command.command == COMMAND_FINAL:
                final = True
            elif (command.command & COMMAND_MASK) == COMMAND_SIBLING:
                if command.count == 0:
                    # The sibling has gone (Dispatcher._close_slot).
                    if (self.siblings_known.drop(command.command >> COMMAND_SLOT_SHIFT)
                            and self.sibling_fds_charged):
                        self.sibling_fds_charged -= 1
                        atomic_add_u32(&self.page.fd_room, 1)
                elif (self.siblings_known.learn(command.command >> COMMAND_SLOT_SHIFT,
                                                data, installed)
                        and atomic_load_u32(&self.page.fd_room) > 1):
                    # One descriptor fewer for connections (see set_fd_room).
                    atomic_sub_u32(&self.page.fd_room, 1)
                    self.sibling_fds_charged += 1
            # COMMAND_WAKE asks only for the report _nudge_if_asked sends.
        # Taken back while this worker was slow to read, the primary waits
        # to hear that its loop turns (see Dispatcher._observe_busy).
        self._nudge_if_asked()
        if self.report_waiting:
            self._send_waiting()
        return fds, stop, final, closed

    # Siblings: taking over what waits in their channels (SiblingChannels)

    cdef inline bint _at_a_limit(self) noexcept:
        """As many open connections as its descriptors or --max-conns allow.

        Stolen connections count like handed ones: the primary checks the
        same two before it hands one (Dispatcher._pick).
        """
        cdef uint32_t open_now = atomic_load_u32(&self.page.open)
        cdef uint32_t room = atomic_load_u32(&self.page.fd_room)
        cdef uint32_t most = atomic_load_u32(&self.page.max_conns)
        return (room != 0 and open_now >= room) or (most != 0 and open_now >= most)

    cdef uint32_t _room_in_hand(self) noexcept:
        """How many more unreached connections this worker may hold (see hand_full).

        Stolen ones count too: taken straight into the hand, they can no
        longer be moved on, so a worker that took more than its
        --queue-depth would have them all caught if it met a slow request
        itself (measured with both workers on one CPU: `skew` p99 33 ms
        taking everything from a stuck sibling, 22 ms without stealing).
        The rest stays in the sibling's channel for the next look.
        """
        cdef uint32_t limit = atomic_load_u32(&self.page.hand_limit)
        if self._at_a_limit() or self.busy_held:
            # Nor while every thread of its pool is busy: it could start
            # none of what it took, any sooner than the sibling.
            return 0
        if limit == 0:
            return 0xFFFFFFFF
        return limit - self.in_hand if self.in_hand < limit else 0

    cdef bint _idle(self) noexcept:
        """Nothing in hand and nothing waiting in its own channel."""
        return self.in_hand == 0 and waiting_in_channel(self.page) == 0

    def could_steal(self):
        """True when steal() would take something (see SiblingChannels.takeable).

        Cheap (loads from the siblings' pages, a clock read when one is in a
        request): the worker asks after every connection it reaches.
        """
        cdef uint32_t now = 0
        cdef int k
        cdef bint idle
        if self._room_in_hand() == 0:
            return False
        idle = self._idle()
        for k in range(self.siblings_known.count):
            if self.siblings_known.takeable(k, &now, idle):
                return True
        return False

    def steal(self):
        """Take handoffs waiting in siblings' channels (see SiblingChannels.takeable): a list of fds.

        They are this worker's from here on, counted as the primary counts
        what it hands (open, queued, in hand); the sibling's counts drop by
        as many, and `reclaimed` on its page tells the primary they left its
        channel.  One message at a time, each whole, so nothing is served
        twice; never a stop meant for the sibling (the primary closes the
        gate first); and only while this worker has descriptors for them.
        """
        cdef list fds = []
        cdef CommandMessage command
        cdef LoadPage *page
        cdef int channel, k
        cdef int *data = NULL
        cdef uint32_t installed, lost, j, now = 0, taken = 0, want
        cdef uint32_t hand_room = self._room_in_hand()
        cdef ssize_t received
        cdef bint idle
        if self.fd < 0:
            return fds
        idle = self._idle()
        for k in range(self.siblings_known.count):
            if taken >= hand_room:
                break
            page = self.siblings_known.pages[k]
            want = self.siblings_known.takeable(k, &now, idle)
            if want > hand_room - taken:
                want = hand_room - taken
            if not want:
                continue
            if not atomic_cas_u32(&page.steal_gate, STEAL_OPEN, STEAL_STEALING):
                continue    # another sibling is in, or a stop is coming
            channel = self.siblings_known.channels[k]
            while want and not self._at_a_limit():
                received = receive_command(channel, &command, &self.control,
                                           &data, &installed)
                if received <= 0:
                    break
                if command.command != COMMAND_HANDOFF:
                    # Never a stop (the gate).  An introduction is the
                    # sibling's: the primary sends it again.  A wake-up is
                    # here only if the sibling has reported or read since it was
                    # sent (the gate stays closed until then), so it has
                    # done what the wake-up asked.
                    close_all(data, installed)
                    if (command.command & COMMAND_MASK) == COMMAND_SIBLING:
                        atomic_store_u32(&page.reintroduce, 1)
                    continue
                atomic_add_u32(&page.reclaimed, command.count)
                atomic_sub_u32(&page.open, command.count)
                atomic_sub_u32(&page.queued, command.count)
                atomic_add_u32(&self.page.open, installed)
                atomic_add_u32(&self.page.queued, installed)
                self.in_hand += installed
                taken += installed
                want -= 1
                for j in range(installed):
                    fds.append(data[j])
                if installed < command.count:
                    lost = command.count - installed
                    self.lost += lost
                    self.lost_total += lost
                    self.report_waiting = True
            atomic_cas_u32(&page.steal_gate, STEAL_STEALING, STEAL_OPEN)
        if taken:
            atomic_add_u32(&self.page.stolen, taken)
        if self.report_waiting:
            self._send_waiting()
        return fds

    @property
    def stolen(self):
        """Connections this worker took from siblings' channels."""
        return atomic_load_u32(&self.page.stolen)

    @property
    def siblings(self):
        """The slots of the siblings this worker knows of."""
        cdef SiblingChannels known = self.siblings_known
        return [k for k in range(known.count) if known.channels[k] >= 0]

    def report(self, uint32_t state):
        """Tell the primary this worker's state (a WorkerState)."""
        self.state = state
        self.report_waiting = True
        self._send_waiting()

    def heartbeat(self):
        """Tell the primary this worker's loop turns: its state once more."""
        self.report_waiting = True
        self._send_waiting()

    def flush(self):
        """Send what waits; True when nothing is left waiting."""
        return self._send_waiting()

    cdef bint _send_waiting(self) noexcept:
        """False only when the primary's socket is full (retry later)."""
        cdef ReportMessage report
        if not self.report_waiting:
            return True
        report.state = self.state
        report.lost = self.lost
        if self.fd >= 0:
            while send(self.fd, &report, sizeof(ReportMessage),
                       MSG_DONTWAIT | MSG_NOSIGNAL) < 0:
                if errno.errno == errno.EINTR:
                    continue
                if errno.errno == errno.EAGAIN or errno.errno == errno.ENOBUFS:
                    return False
                break   # EPIPE: the primary is gone, nobody is left to tell
        self.report_waiting = False
        self.lost = 0
        return True


cdef extern from "Python.h":
    ctypedef enum PySendResult:
        PYGEN_RETURN
        PYGEN_ERROR
        PYGEN_NEXT
    PySendResult PyIter_Send(object iterator, object value, PyObject **result)
    ctypedef PySendResult (*sendfunc)(PyObject *, PyObject *, PyObject **) noexcept
    ctypedef struct PyAsyncMethods:
        sendfunc am_send
    ctypedef PyObject *(*iternextfunc)(PyObject *) noexcept
    ctypedef struct AsyncTypeObject "PyTypeObject":
        PyAsyncMethods *tp_as_async
        iternextfunc tp_iternext
    void PyErr_SetObject(object type, object value)


cdef PySendResult send_stamped(PyObject *steps, PyObject *value,
                               PyObject **result) noexcept:
    """StampedSteps' am_send: one step of the app's coroutine, stamped.

    On Python 3.11 the interpreter's `await` sends through this slot when a
    type has it: the step's end then comes back as PYGEN_RETURN, where
    __next__ could only say it by raising StopIteration, which Cython's error
    path turns into a frame and a traceback: about 2,400 instructions per
    request (callgrind). Python 3.12 and later, and a compiled caller, step
    through tp_iternext instead: next_stamped, below.
    """
    cdef StampedSteps stamped = <StampedSteps>steps
    cdef PySendResult status
    stamped.channel._begin()
    status = PyIter_Send(stamped.coro, <object>value, result)
    stamped.channel._end()
    return status


cdef PyObject *next_stamped(PyObject *steps) noexcept:
    """StampedSteps' __next__: one step of the app's coroutine, stamped.

    What a compiled caller (pyworker.asgi's RequestCycle.run) and Python
    3.12's `await` use.  The coroutine's end is a NULL with no exception set
    when it returns None, as every ASGI app does: the StopIteration that
    `coro.send()` would raise costs an exception object, and Cython's
    `finally` around it a traceback (about 2,000 instructions a request).
    """
    cdef PyObject *result = NULL
    if send_stamped(steps, <PyObject *>None, &result) == PYGEN_RETURN:
        if result != <PyObject *>None:
            PyErr_SetObject(StopIteration, (<object>result,))
        Py_XDECREF(result)
        return NULL
    return result   # the awaited future (PYGEN_NEXT), or NULL with the error set


cdef int error_is_set() except -1:
    return -1   # tells Cython to raise the exception already set


cdef adoption_failed(fd, protocol, failed):
    """The exception a step of an adoption raised, to failed(fd, protocol, exc)."""
    try:
        error_is_set()
    except Exception as exc:
        failed(fd, protocol, exc)
    return None


def step_adoption(coroutine, fd, protocol, failed):
    """One step of a coroutine that adopts `fd`: what it waits for next, None once it has ended.

    Worker.adopt_all steps uvloop's connect_accepted_socket through this
    once or twice per connection, by hand.  An exception it raises goes to
    failed(fd, protocol, exc), and the adoption has ended.  The coroutine
    must yield futures only: a bare `yield` (None) would read as its end.
    Through PyIter_Send the coroutine's end is a return value: no
    StopIteration is made and caught, and no Python frame runs.
    """
    cdef PyObject *result = NULL
    cdef PySendResult status = PyIter_Send(coroutine, None, &result)
    if status == PYGEN_ERROR:
        return adoption_failed(fd, protocol, failed)
    value = <object>result
    Py_XDECREF(result)
    return value if status == PYGEN_NEXT else None


@cython.final
cdef class StampedSteps:
    """The iterator `await channel.stamped(coro)` runs: each step of `coro` stamped.

    A Python generator doing the same costs a frame and two method calls per
    step, on every request of every app; this is the C equivalent.
    """

    cdef object coro
    cdef WorkerChannel channel

    def __cinit__(self, coro, WorkerChannel channel):
        self.coro = coro
        self.channel = channel

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):
        # What Python's it.__next__() finds; next(it), `await` and Cython's
        # yield-from go through tp_iternext, which is next_stamped.
        self.channel._begin()
        try:
            return self.coro.send(None)
        finally:
            self.channel._end()

    def send(self, value):
        self.channel._begin()
        try:
            return self.coro.send(value)
        finally:
            self.channel._end()

    def throw(self, typ, val=None, tb=None):
        self.channel._begin()
        try:
            if val is None and tb is None:
                return self.coro.throw(typ)
            return self.coro.throw(typ, val, tb)
        finally:
            self.channel._end()

    def close(self):
        return self.coro.close()


(<AsyncTypeObject *>StampedSteps).tp_as_async.am_send = send_stamped
(<AsyncTypeObject *>StampedSteps).tp_iternext = next_stamped


@cython.final
cdef class HandedSocket:
    """What uvloop's connect_accepted_socket needs of a handed fd, and no more.

    uvloop reads `family`, `type` and `fileno()`, and calls `close()` on an
    object that is not a socket.socket once libuv has closed the fd itself.
    A real socket.socket costs about 3 us more per connection (measured):
    building it, and converting family and type to enums on every read.
    uvloop reads all but close() during the coroutine's first step, so one
    object serves every connection, its `fd` set before each
    (Worker.adopt_all).  Compiled, because fileno() and close() are called
    once per connection: a Python method costs a frame each time.
    """

    cdef public int fd
    cdef readonly object family

    def __init__(self, int fd, family):
        self.fd = fd
        self.family = family

    @property
    def type(self):
        return 1    # SOCK_STREAM

    def fileno(self):
        return self.fd

    def close(self):
        pass    # the transport owns the fd and has closed it
