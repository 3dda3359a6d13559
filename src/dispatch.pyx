# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The primary's accept loop, and the fd handoff both ends of a channel use.

The primary waits in epoll on the listening socket, one channel per worker
(a SOCK_SEQPACKET socketpair) and a wake-up fd written by signal handlers.
When the listener is readable it accepts until EAGAIN, picks a worker for
each connection and, once per wake-up, sends every worker its batch in one
sendmsg carrying the fds as SCM_RIGHTS.  Nothing in that path creates a
Python object: connections are ints in C arrays from accept4 to close.

The primary keeps its copy of each handed fd until the worker acknowledges
the batch.  A worker acknowledges a batch as soon as it has received it and
before it reads a byte, so a connection that was never acknowledged was never
touched and can be handed to another worker if its worker goes away.

Each worker shares a load page with the primary (LoadPage): how many
connections it holds open, how many of those have not had their first
request answered yet (its queue), and since when it has been inside a
request's callbacks, if it is.  The primary reads them directly, so none of
this costs a message or a wake-up.  A worker whose queue holds `queue_depth`
connections gets no more, and neither does one that has been inside one
request for over 300 microseconds (it is busy with slow work): new connections
wait in the listener's backlog, one queue for all workers, and go to the
first worker that catches up.  A request stuck behind a slow one in a
worker's queue is what makes tail latency; a shared queue keeps that short.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from libc cimport errno
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset, strerror
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec
from posix.unistd cimport close, read

from system cimport (
    atomic_add_u32, atomic_exchange_u32, atomic_load_u32, atomic_store_u32,
    atomic_sub_u32, CMSG_DATA, CMSG_FIRSTHDR, CMSG_LEN, CMSG_SPACE, EPOLL_CLOEXEC,
    EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLIN, MAP_FAILED,
    MAP_SHARED, MSG_CMSG_CLOEXEC, MSG_CTRUNC, MSG_DONTWAIT, MSG_NOSIGNAL,
    PROT_READ, PROT_WRITE, SCM_RIGHTS, SOCK_CLOEXEC, SOCK_NONBLOCK,
    SOL_SOCKET, accept4, cmsghdr, epoll_create1, epoll_ctl, epoll_event,
    epoll_wait, mmap, mmsghdr, msghdr, munmap, recvmmsg, recvmsg, send,
    sendmsg,
)


cdef enum:
    # SCM_MAX_FD: the kernel refuses more fds than this in one message.
    MAX_FDS_PER_MESSAGE = 253
    # Bounds one wake-up, so acknowledgements and signals are not starved
    # under a flood of new connections.
    MAX_ACCEPTS_PER_WAKE = 1024
    MAX_EPOLL_EVENTS = 64
    MAX_REPORTS_PER_READ = 32
    # A worker inside one request's callbacks for longer than this is busy
    # with slow work: serving a plain request takes tens of microseconds.
    STUCK_MICROSECONDS = 300
    # While some worker is stuck, the others may hold this many times
    # --queue-depth unanswered: they take the load in bigger batches.
    STUCK_DEPTH_FACTOR = 4
    LOAD_PAGE_SIZE = 4096

# epoll tags: a channel is tagged with its slot index, these with values no
# slot index can take.
cdef uint64_t TAG_LISTENER = 1ULL << 40
cdef uint64_t TAG_WAKE = 2ULL << 40

# How long accepting pauses when the process is out of descriptors: long
# enough not to spin, short enough that service resumes as soon as
# connections close.
cdef double ACCEPT_PAUSE_SECONDS = 0.1
# A worker that could not install a handoff (out of descriptors) gets nothing
# beyond its current load for this long, so its connections are not bounced
# between full workers in a loop.
cdef double WORKER_FULL_SECONDS = 1.0


# Wire format.  Both ends are this module on one machine, so native layout.

cdef enum Command:          # primary -> worker
    COMMAND_HANDOFF = 1     # fds in SCM_RIGHTS, `count` of them
    COMMAND_STOP = 2        # finish what you hold and exit; nothing follows

cdef struct CommandMessage:
    uint32_t command
    uint32_t count

cdef struct ReportMessage:  # worker -> primary
    uint32_t handed         # fds in the handoff acknowledged; 0: state only
    uint32_t taken          # of those, how many the worker could install
    uint32_t state          # a WorkerState; every report is also a heartbeat
    uint32_t reserved

cdef struct HandoffControl:  # ancillary buffer for one handoff
    cmsghdr header
    int fds[MAX_FDS_PER_MESSAGE]


# The page a worker shares with the primary (a memfd both map).
#
# The nudge is a store-then-load handshake on each side, so that the primary
# cannot go to sleep waiting for a worker to have room while the worker makes
# room unseen: the primary sets `nudge` and then reads the page; the worker
# lowers a count or clears `busy_since` and then reads `nudge`, and if it is
# set, clears it and sends a report, which wakes the primary.  With
# sequentially consistent accesses at least one side sees the other's write.
cdef struct LoadPage:
    uint32_t open       # connections the worker holds (written by the worker)
    uint32_t queued     # of those, first request not answered yet (the worker)
    uint32_t nudge      # set by the primary, cleared by the worker
    uint32_t busy_since  # microsecond clock (wrapping) when the worker entered
                         # a request's callbacks; 0 when it is between them


cpdef enum WorkerState:     # a worker's state, as it reports it
    WORKER_STARTING = 0
    WORKER_READY = 1
    WORKER_DRAINING = 2
    WORKER_RECYCLE = 3      # serving, and asking to be replaced (max requests)

cpdef enum Event:           # what run() returns: (event, slot) or (event, errno)
    EVENT_READY = 1             # the worker in the slot reported ready
    EVENT_DRAINING = 2          # the worker is finishing up of its own accord
    EVENT_CLOSED = 4            # the worker's channel closed: it is gone
    EVENT_ACCEPT_PAUSED = 8     # accept failed for lack of descriptors or memory
    EVENT_ACCEPT_RESUMED = 16   # a connection was accepted again after a pause
    EVENT_WORKER_FULL = 32      # the worker ran out of descriptors
    EVENT_RECYCLE = 64          # the worker asks to be replaced; it still serves

POLICIES = ("least-conn", "round-robin")
cdef enum Policy:
    POLICY_LEAST_CONN = 0
    POLICY_ROUND_ROBIN = 1

cdef enum SlotState:
    SLOT_EMPTY = 0      # no worker attached
    SLOT_STARTING = 1   # attached, waiting for the worker to report ready
    SLOT_ACTIVE = 2     # receives new connections
    SLOT_RETIRING = 3   # finishes what it holds, gets nothing new


if sizeof(HandoffControl) < CMSG_SPACE(MAX_FDS_PER_MESSAGE * sizeof(int)):
    raise ImportError("HandoffControl is smaller than CMSG_SPACE(253 fds)")


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


cdef int send_handoff(int channel, const int *fds, int count) noexcept nogil:
    """Send `count` (<= 253) fds in one message; 0 or the errno."""
    cdef CommandMessage command
    cdef HandoffControl control
    cdef iovec iov
    cdef msghdr msg
    cdef cmsghdr *header
    command.command = COMMAND_HANDOFF
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


cdef LoadPage *map_load_page(int load_fd) except NULL:
    cdef void *page = mmap(NULL, LOAD_PAGE_SIZE, PROT_READ | PROT_WRITE,
                           MAP_SHARED, load_fd, 0)
    if page == MAP_FAILED:
        raise_errno(errno.errno)
    return <LoadPage *>page


# The primary.

cdef struct Slot:
    int channel             # primary's end of the socketpair, -1 when empty
    SlotState state
    bint congested          # its channel was full; skipped until it reports
    bint stop_pending       # COMMAND_STOP could not be sent yet
    LoadPage *page          # shared with the worker
    uint32_t full_at        # load at which it ran out of descriptors...
    double full_until       # ...which caps it until then; 0 when not capped
    bint starved            # out of descriptors since its last full take
    uint32_t events         # EVENT_* bits not yet returned to Python
    bint recycle_asked      # EVENT_RECYCLE was returned for this worker
    double last_heard       # when its last report came: the watchdog's clock
    bint stuck              # in one request for over STUCK_MICROSECONDS (_pick)
    uint64_t handed_total   # connections handed to this worker, for stats
    uint32_t orphaned       # left for others when its channel closed
    FdQueue handed          # sent, not yet acknowledged, oldest first
    int batch_len
    int batch[MAX_FDS_PER_MESSAGE]  # accepted this wake-up, not yet sent


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
        Policy policy
        uint32_t max_conns
        uint32_t queue_depth
        Slot *slots
        int nslots
        int next_slot           # where a pick starts looking: ties rotate
        FdQueue orphans         # to re-dispatch: their worker never took them
        bint listener_armed
        bint closing            # taking the whole backlog: limits do not apply
        double resume_accept_at  # end of an EMFILE pause; 0 when not paused
        bint accept_paused      # from a failed accept to the next success
        int pause_errno
        uint32_t accept_events  # EVENT_ACCEPT_* not yet returned to Python
        bint has_events
        bint any_stuck          # some worker is stuck (see _observe_busy)
        uint64_t accepted_total
        uint64_t redispatched_total
        mmsghdr report_headers[MAX_REPORTS_PER_READ]
        iovec report_iovs[MAX_REPORTS_PER_READ]
        ReportMessage reports[MAX_REPORTS_PER_READ]

    def __cinit__(self, int listen_fd=-1, int wake_fd=-1,
                  str policy="least-conn", uint32_t max_conns=1024,
                  uint32_t queue_depth=2):
        cdef int k
        self.epfd = -1
        self.listen_fd = -1
        self.wake_fd = -1
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
        if max_conns < 1:
            raise ValueError("max_conns must be at least 1")
        if queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        self.policy = POLICY_LEAST_CONN if policy == "least-conn" \
            else POLICY_ROUND_ROBIN
        self.max_conns = max_conns
        self.queue_depth = queue_depth
        memset(&self.orphans, 0, sizeof(FdQueue))
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
        cdef int k
        if s.channel >= 0:
            close(s.channel)
            s.channel = -1
        for k in range(s.batch_len):
            close(s.batch[k])
        s.batch_len = 0
        fdq_close_all(&s.handed)
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
            self.slots = slots
            self.nslots = index + 1
        return &self.slots[index]

    # The supervisor's side: workers come and go.

    def attach(self, int slot, int channel_fd, int load_fd):
        """Attach a new worker: its channel and its load page.

        The channel is owned from now on, unless this raises.  The slot gets
        connections once the worker reports ready.
        """
        cdef Slot *s = self._slot(slot)
        cdef LoadPage *page
        if s.channel >= 0:
            raise ValueError(f"slot {slot} already has a worker")
        page = map_load_page(load_fd)
        try:
            self._watch(channel_fd, <uint64_t>slot, EPOLLIN)
        except BaseException:
            munmap(page, LOAD_PAGE_SIZE)
            raise
        s.page = page
        s.channel = channel_fd
        s.state = SLOT_STARTING
        s.full_until = 0
        s.starved = False
        s.congested = False
        s.stop_pending = False
        s.events = 0
        s.recycle_asked = False
        s.stuck = False
        s.last_heard = monotonic()
        s.handed_total = 0
        s.orphaned = 0
        s.batch_len = 0

    def detach(self, int slot):
        """Forget the worker in `slot` (it exited).

        Its last acknowledgements are read first; whatever it never took is
        queued for another worker.  Returns how many connections that is.
        """
        cdef uint32_t orphaned
        if slot >= self.nslots:
            return 0
        if self.slots[slot].channel >= 0:
            self._read_reports(slot)
            self._close_slot(slot, False)
        orphaned = self.slots[slot].orphaned
        self.slots[slot].orphaned = 0
        return orphaned

    def retire(self, int slot):
        """Hand `slot` nothing more, then tell its worker to stop."""
        cdef Slot *s
        if slot >= self.nslots or self.slots[slot].channel < 0:
            return
        s = &self.slots[slot]
        s.state = SLOT_RETIRING
        self._flush(slot)
        if s.channel >= 0:
            s.stop_pending = True
            self._send_stop(slot)

    def close_listener(self):
        """Stop accepting: hand out what the backlog already holds, then close.

        The backlog is the queue the workers share, and with deferred accept
        each connection in it has sent its request: closing the listener
        would reset them.  So every one goes to a worker now, past the queue
        depth and max-conns, which only decide how soon.  Returns how many.
        """
        cdef int taken = 0
        if self.listen_fd < 0:
            return 0
        self.closing = True
        taken = self._accept_connections(0x7fffffff)
        self._settle()
        self.closing = False
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.listen_fd, NULL)
        close(self.listen_fd)
        self.listen_fd = -1
        self.listener_armed = False
        return taken

    def silence(self, int slot):
        """Seconds since the worker in `slot` last reported; 0 for an empty slot.

        A worker reports on every handoff and at least once a second (its
        heartbeat), so a long silence means its event loop is not turning.
        """
        if slot >= self.nslots or self.slots[slot].channel < 0:
            return 0.0
        return monotonic() - self.slots[slot].last_heard

    def load(self, int slot):
        """(open, queued, in_flight, handed_total) for the worker in `slot`."""
        cdef Slot *s
        if slot >= self.nslots or self.slots[slot].channel < 0:
            return (0, 0, 0, 0)
        s = &self.slots[slot]
        return (atomic_load_u32(&s.page.open), atomic_load_u32(&s.page.queued),
                s.handed.count + s.batch_len, s.handed_total)

    @property
    def orphans(self):
        """Connections waiting for a worker because theirs went away."""
        return self.orphans.count

    @property
    def accepted(self):
        return self.accepted_total

    @property
    def redispatched(self):
        return self.redispatched_total

    @property
    def listening(self):
        return self.listen_fd >= 0

    # The loop.

    def run(self, double timeout):
        """Serve until Python has something to do, or `timeout` seconds pass.

        Returns a list of (EVENT_*, slot) pairs; ACCEPT events carry the errno
        instead of a slot.  An empty list means a signal arrived (the wake-up
        fd) or the time ran out.
        """
        cdef epoll_event events[MAX_EPOLL_EVENTS]
        cdef double deadline = monotonic() + timeout
        cdef double now, until
        cdef int n, k, wait_ms
        cdef uint64_t tag
        cdef bint woke = False, listener_ready, polled = False
        while True:
            self._settle()
            now = monotonic()
            if self.resume_accept_at and now >= self.resume_accept_at:
                self.resume_accept_at = 0
            self._arm_listener()
            # Look at the fds at least once, even with no time left: a caller
            # that keeps passing 0 must still see reports and connections.
            if woke or self.has_events or (now >= deadline and polled):
                break
            polled = True
            until = deadline
            if self.resume_accept_at and self.resume_accept_at < until:
                until = self.resume_accept_at
            wait_ms = 0 if until <= now else <int>((until - now) * 1000.0) + 1
            with nogil:
                n = epoll_wait(self.epfd, events, MAX_EPOLL_EVENTS, wait_ms)
            if n < 0:
                if errno.errno != errno.EINTR:
                    raise_errno(errno.errno)
                # A signal whose handler may have raised; Python decides.
                PyErr_CheckSignals()
                woke = True
                continue
            listener_ready = False
            for k in range(n):
                tag = events[k].data.u64
                if tag == TAG_LISTENER:
                    listener_ready = True
                elif tag == TAG_WAKE:
                    self._drain_wake_fd()
                    woke = True
                else:
                    self._read_reports(<int>tag)
            # Reports first: acknowledgements free capacity for these.
            if listener_ready and self.listen_fd >= 0:
                self._accept_connections(MAX_ACCEPTS_PER_WAKE)
        return self._collect_events()

    cdef int _settle(self) except -1:
        """Re-dispatch orphans, then one sendmsg per worker with a batch."""
        cdef int i, target
        if self.orphans.count:
            self._observe_busy()
        while self.orphans.count:
            target = self._pick()
            if target < 0:
                break
            self.redispatched_total += 1
            self._assign(target, fdq_pop(&self.orphans))
        for i in range(self.nslots):
            if self.slots[i].batch_len:
                self._flush(i)
            if self.slots[i].stop_pending:
                self._send_stop(i)
        return 0

    cdef int _pick(self) noexcept:
        """The slot for the next connection, or -1 when no worker can take one.

        least-conn orders workers by the connections they have not answered
        yet, then by those they hold: a worker busy with a slow request
        answers nothing, so its count stays up while a healthy worker's falls
        back to zero within one turn of its loop.  With nothing unanswered
        (keep-alive traffic) this is plain least connections.  Workers that
        _observe_busy last marked stuck get nothing.
        """
        cdef int best = -1, i, k
        cdef uint32_t load, in_flight, unread, depth
        cdef uint64_t rank, best_rank = 0xFFFFFFFFFFFFFFFF
        cdef Slot *s
        for k in range(self.nslots):
            i = self.next_slot + k
            if i >= self.nslots:
                i -= self.nslots
            s = &self.slots[i]
            if s.state != SLOT_ACTIVE or s.congested:
                continue
            in_flight = s.handed.count + s.batch_len
            unread = atomic_load_u32(&s.page.queued) + in_flight
            load = atomic_load_u32(&s.page.open) + in_flight
            if not self.closing:
                if s.stuck:
                    continue
                depth = self.queue_depth
                if self.any_stuck:
                    depth *= STUCK_DEPTH_FACTOR
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

    cdef void _observe_busy(self) noexcept:
        """Mark the workers stuck in a slow request, for the picks that follow.

        A worker that has been in one request for a while is busy with slow
        work, and whatever it is handed waits for that: _pick gives it nothing
        (it nudges when it leaves the request, see WorkerChannel.end), and
        meanwhile the others may queue more, so that they take the load in
        fewer, bigger batches.  Looked at once per batch of picks, not per
        connection: within one wake-up it does not change in a way that
        matters.
        """
        cdef uint32_t since, now = 0
        cdef int i
        cdef Slot *s
        self.any_stuck = False
        for i in range(self.nslots):
            s = &self.slots[i]
            s.stuck = False
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
                    self.any_stuck = True

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
        while accepted < limit:
            target = self._pick()
            if target < 0:
                break   # every worker is full: the backlog holds the rest
            fd = accept4(self.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno.errno
                if err == errno.EAGAIN:
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
        return accepted

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
        if self.listen_fd >= 0 and self.resume_accept_at == 0:
            self._observe_busy()
            want = self._pick() >= 0
            if not want:
                # Ask every worker to say when it has room, then look once
                # more: a worker that made room in between is seen here, any
                # later one sends the nudge (see LoadPage).
                for i in range(self.nslots):
                    if self.slots[i].state == SLOT_ACTIVE:
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
        cdef int k, err
        if s.batch_len == 0:
            return 0
        err = send_handoff(s.channel, s.batch, s.batch_len)
        if err == 0:
            for k in range(s.batch_len):
                fdq_push(&s.handed, s.batch[k])
            s.handed_total += s.batch_len
            s.batch_len = 0
            return 0
        # Not sent, so never seen by the worker: another can have them.
        for k in range(s.batch_len):
            fdq_push(&self.orphans, s.batch[k])
        s.batch_len = 0
        if (err == errno.EAGAIN or err == errno.ENOBUFS or err == errno.ENOMEM
                or err == errno.ETOOMANYREFS):
            # Its channel is full (it is not reading) or the kernel's limit
            # on fds in flight is reached; try it again after it reports.
            s.congested = True
        else:
            self._close_slot(i, True)   # EPIPE, ECONNRESET: it is gone
        return 0

    cdef int _send_stop(self, int i) except -1:
        cdef Slot *s = &self.slots[i]
        cdef int err
        if s.batch_len:
            return 0    # the batch goes first; retried by the next _settle
        err = send_command(s.channel, COMMAND_STOP)
        if err == 0 or (err != errno.EAGAIN and err != errno.ENOBUFS):
            # Sent, or the worker is gone and its EOF will tell.
            s.stop_pending = False
        return 0

    cdef int _read_reports(self, int i) except -1:
        cdef Slot *s = &self.slots[i]
        cdef int n, k
        while s.channel >= 0:
            n = recvmmsg(s.channel, self.report_headers, MAX_REPORTS_PER_READ,
                         MSG_DONTWAIT, NULL)
            if n < 0:
                if errno.errno == errno.EINTR:
                    continue
                if errno.errno != errno.EAGAIN:
                    self._close_slot(i, True)   # ECONNRESET: the worker died
                return 0
            for k in range(n):
                if self.report_headers[k].msg_len != sizeof(ReportMessage):
                    # Zero bytes is the end of the stream: the worker exited.
                    # (Workers never send anything else of another size.)
                    self._close_slot(i, True)
                    return 0
                self._apply_report(s, &self.reports[k])
            if n < MAX_REPORTS_PER_READ:
                return 0
        return 0

    cdef int _apply_report(self, Slot *s, ReportMessage *report) except -1:
        cdef uint32_t k, count
        s.congested = False
        s.last_heard = monotonic()
        if report.handed:
            count = report.handed if report.handed <= s.handed.count \
                else s.handed.count
            for k in range(count):
                if k < report.taken:
                    close(fdq_pop(&s.handed))
                else:
                    # The worker could not install it (out of descriptors).
                    fdq_push(&self.orphans, fdq_pop(&s.handed))
            if report.taken < report.handed:
                if not s.starved:   # said once an episode, however long
                    s.starved = True
                    s.events |= EVENT_WORKER_FULL
                    self.has_events = True
                s.full_at = atomic_load_u32(&s.page.open)
                s.full_until = monotonic() + WORKER_FULL_SECONDS
            else:
                s.starved = False
        if report.state == WORKER_READY and s.state == SLOT_STARTING:
            s.state = SLOT_ACTIVE
            s.events |= EVENT_READY
            self.has_events = True
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

    cdef uint32_t _close_slot(self, int i, bint notify) except? 0xFFFFFFFF:
        """The worker in slot i is gone: queue what it never took for others."""
        cdef Slot *s = &self.slots[i]
        cdef uint32_t orphaned = s.handed.count + s.batch_len
        cdef int k
        if s.channel < 0:
            return 0
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, s.channel, NULL)
        close(s.channel)
        s.channel = -1
        while s.handed.count:
            fdq_push(&self.orphans, fdq_pop(&s.handed))
        for k in range(s.batch_len):
            fdq_push(&self.orphans, s.batch[k])
        s.batch_len = 0
        if s.page != NULL:
            munmap(s.page, LOAD_PAGE_SIZE)
            s.page = NULL
        s.state = SLOT_EMPTY
        s.stop_pending = False
        s.orphaned = orphaned
        if notify:
            s.events |= EVENT_CLOSED
            self.has_events = True
        return orphaned

    cdef void _drain_wake_fd(self) noexcept:
        cdef char buffer[64]
        while read(self.wake_fd, buffer, sizeof(buffer)) > 0:
            pass

    cdef list _collect_events(self):
        cdef list events = []
        cdef int i
        cdef uint32_t bit
        if not self.has_events:
            return events
        for i in range(self.nslots):
            for bit in (EVENT_READY, EVENT_DRAINING, EVENT_CLOSED,
                        EVENT_WORKER_FULL, EVENT_RECYCLE):
                if self.slots[i].events & bit:
                    events.append((bit, i))
            self.slots[i].events = 0
        for bit in (EVENT_ACCEPT_PAUSED, EVENT_ACCEPT_RESUMED):
            if self.accept_events & bit:
                events.append((bit, self.pause_errno))
        self.accept_events = 0
        self.has_events = False
        return events


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
        bint ack_waiting        # an acknowledgement the primary has not taken
        ReportMessage ack
        bint state_waiting
        HandoffControl control
        bint busy_held          # hold_busy(): begin/end leave the stamp alone

    def __cinit__(self, int fd, int load_fd=-1):
        self.fd = -1
        self.page = &self.local_page
        if load_fd >= 0:
            self.page = map_load_page(load_fd)
            self.mapped = True
        self.fd = fd
        self.state = WORKER_STARTING

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
        return atomic_load_u32(&self.page.open)

    @property
    def queued(self):
        """Handed connections this worker has not started reading."""
        return atomic_load_u32(&self.page.queued)

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
            atomic_store_u32(&self.page.busy_since, clock_us())
        else:
            self._end()

    def stamped(self, coro):
        """`coro`, driven step by step with begin() and end() around each step.

        Awaiting it instead of `coro` marks the worker busy while the app's
        code runs, and only then: not while it waits.
        """
        return StampedSteps(coro, self)

    def dequeue(self):
        """A handed connection is answered (or is gone): off the queue."""
        atomic_sub_u32(&self.page.queued, 1)
        self._nudge_if_asked()

    cdef inline void _begin(self) noexcept:
        if not self.busy_held:
            atomic_store_u32(&self.page.busy_since, clock_us())

    cdef inline void _end(self) noexcept:
        if not self.busy_held:
            atomic_store_u32(&self.page.busy_since, 0)
            self._nudge_if_asked()

    cdef void _nudge_if_asked(self) noexcept:
        # The primary waits for room here (see LoadPage): wake it.
        if atomic_load_u32(&self.page.nudge) and \
                atomic_exchange_u32(&self.page.nudge, 0):
            self.state_waiting = True
            self._send_waiting()

    @property
    def backlogged(self):
        """True while a report waits for room in the primary's socket."""
        return self.ack_waiting or self.state_waiting

    def receive(self):
        """Take what the primary has queued: (fds, stop, closed).

        `fds` are the connections to serve, in order; each handoff is
        acknowledged before this returns, that is before a byte of them is
        read.  They count as open and queued connections from now on (see
        dequeue).  `stop` is True when the primary asked this worker to finish
        and exit; `closed` when the channel reached its end (the primary is
        gone).
        """
        cdef CommandMessage command
        cdef iovec iov
        cdef msghdr msg
        cdef cmsghdr *header
        cdef ssize_t received
        cdef int *data
        cdef uint32_t taken, k
        cdef list fds = []
        cdef bint stop = False, closed = False
        while self.fd >= 0:
            if self.ack_waiting and not self._send_waiting():
                break   # the primary is not reading: take nothing more yet
            iov.iov_base = &command
            iov.iov_len = sizeof(command)
            memset(&msg, 0, sizeof(msg))
            msg.msg_iov = &iov
            msg.msg_iovlen = 1
            msg.msg_control = &self.control
            msg.msg_controllen = sizeof(self.control)
            received = recvmsg(self.fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
            if received < 0:
                if errno.errno == errno.EINTR:
                    continue
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
                taken = 0
                header = CMSG_FIRSTHDR(&msg)
                if (header != NULL and header.cmsg_level == SOL_SOCKET
                        and header.cmsg_type == SCM_RIGHTS):
                    # With MSG_CTRUNC (this process is out of descriptors)
                    # the kernel installed the first ones and dropped the
                    # rest; `taken` < `handed` tells the primary to re-send.
                    taken = (header.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                    data = <int *>CMSG_DATA(header)
                    for k in range(taken):
                        fds.append(data[k])
                atomic_add_u32(&self.page.open, taken)
                atomic_add_u32(&self.page.queued, taken)
                self.ack.handed = command.count
                self.ack.taken = taken
                self.ack.state = self.state
                self.ack.reserved = 0
                self.ack_waiting = True
                self._send_waiting()
            elif command.command == COMMAND_STOP:
                stop = True
        return fds, stop, closed

    def report(self, uint32_t state):
        """Tell the primary this worker's state (a WorkerState)."""
        self.state = state
        self.state_waiting = True
        self._send_waiting()

    def heartbeat(self):
        """Tell the primary this worker's loop turns: its state once more.

        Nothing is queued when a report already waits: that one will do.
        """
        if not self.state_waiting:
            self.state_waiting = True
            self._send_waiting()

    def flush(self):
        """Send what waits; True when nothing is left waiting."""
        return self._send_waiting()

    cdef bint _send_waiting(self) noexcept:
        cdef ReportMessage state_report
        if self.ack_waiting:
            if not self._send_report(&self.ack):
                return False
            self.ack_waiting = False
        if self.state_waiting:
            state_report.handed = 0
            state_report.taken = 0
            state_report.state = self.state
            state_report.reserved = 0
            if not self._send_report(&state_report):
                return False
            self.state_waiting = False
        return True

    cdef bint _send_report(self, ReportMessage *report) noexcept:
        """False only when the primary's socket is full (retry later)."""
        if self.fd < 0:
            return True
        while send(self.fd, report, sizeof(ReportMessage),
                   MSG_DONTWAIT | MSG_NOSIGNAL) < 0:
            if errno.errno == errno.EINTR:
                continue
            # EPIPE: the primary is gone and nobody is left to tell.
            return errno.errno != errno.EAGAIN and errno.errno != errno.ENOBUFS
        return True


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
