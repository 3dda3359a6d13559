# Augments asgi.py when Cython compiles it (setup.py): the connection and
# its requests become extension types whose fields are C struct members,
# so the parser's callbacks and the app's send/receive read them without
# Python attribute lookups.

# Read by every response's build_head: typed, they are C-level lookups
# (and, compiled, no longer attributes of the pyworker.asgi module).
cdef tuple CONTENT_LENGTH_LINES
cdef dict END_OF_HEAD
cdef dict HEADER_LINES
cdef dict STATUS_LINE_OF


cdef class AsgiProtocol


cdef class AsgiConfig:
    cdef public object app
    cdef public str root_path
    cdef public bytes root_path_bytes
    cdef public object trust
    cdef public dict state
    cdef public bint access_log
    cdef public str scheme
    cdef public bint native
    cdef public object local

cdef class RequestCycle:
    cdef public AsgiProtocol protocol
    cdef public dict scope
    cdef public list body
    cdef public Py_ssize_t body_size
    cdef public bint body_complete
    cdef public bint body_delivered
    cdef public Py_ssize_t discarded
    cdef public bint expect_continue
    cdef public object waiter
    cdef public bint disconnected
    cdef public bint keep_alive
    cdef public bint response_started
    cdef public bint response_complete
    cdef public object status
    cdef public object headers
    cdef public bint chunked
    cdef public object content_length
    cdef public Py_ssize_t sent_bytes
    cdef public bint head
    cdef public bint head_sent
    cdef public bint http11
    cdef public Py_ssize_t response_bytes

    cdef feed_body(self, chunk)
    cdef wake(self)
    cdef bytes build_head(self, body, bint more_body)
    cdef answer_error(self, int status)
    cdef log_access(self, double duration)


cdef class AsgiProtocol:
    cdef public object server
    cdef public AsgiConfig config
    cdef public object loop
    cdef public object transport
    cdef public object parser
    cdef public object client
    cdef public object local
    cdef public bint trusted_proxy
    cdef public object scheme
    cdef public RequestCycle parsing
    cdef public RequestCycle cycle
    cdef public bint cycle_due
    cdef public object context
    cdef public object pipeline
    cdef public bytes url
    cdef public list headers
    cdef public Py_ssize_t head_bytes
    cdef public int noted
    cdef public Py_ssize_t head_seen
    cdef public double head_since
    cdef public double last_active
    cdef public bint closing
    cdef public bint close_after
    cdef public bint reading_paused
    cdef public object writes
    cdef public object rejected
    cdef public Py_ssize_t served
    cdef public object queued_at
    cdef public object websocket
    cdef public dict scope_base

    cdef rebase_scope(self)
    cdef pause_reading(self)
    cdef resume_reading(self)
    cdef upgrade(self, rest)
    cdef start(self, RequestCycle cycle, bint eager=*, context=*)
    cdef cycle_finished(self, RequestCycle cycle)
    cdef reject(self, int status)
    cdef Py_ssize_t write_error(self, int status) except -1
    cpdef close(self)
