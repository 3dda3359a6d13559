# cython: language_level=3
"""A handed connection served the way uvloop serves one it accepted itself.

uvloop's public way to serve an fd accepted elsewhere is
connect_accepted_socket: a coroutine that makes the transport, then waits on
a future until connection_made has run.  Per connection that is a coroutine,
a future, a copied context, a Python-level asyncio.isfuture() and a second
turn of the loop to end the coroutine: 18% of the instructions a new
connection cost a worker in dispatch mode (bench/RESULTS.md, "The fifth run
(night of 2026-12-01)"), none of which uvloop's own accept, the one
reuseport's workers take, pays.  adopt_tcp takes that accept's steps
instead: the transport made by TCPTransport.new, the fd opened into it, connection_made scheduled for the
next turn of the loop, as after accept().

It reaches those steps through uvloop's Cython declarations, which its wheel
ships, so it depends on uvloop's private layout: it is compiled against the
uvloop installed when cydispatch is built, and used only with that one
(pyworker.worker.load_direct_adoption checks).
"""

from uvloop.loop cimport Loop, TCPTransport

cdef extern from *:
    # The version of the uvloop whose .pxd files this was compiled against,
    # defined by setup.py.
    const char *CYDISPATCH_UVLOOP_VERSION


BUILT_FOR_UVLOOP = CYDISPATCH_UVLOOP_VERSION.decode()


def adopt_tcp(Loop loop, protocol, int fd, context):
    """Serve the connected TCP socket `fd` with `protocol` on `loop`.

    From here on the transport owns `fd` and closes it.  Raises OSError if
    libuv cannot take it; then `fd` is still the caller's to close.
    """
    cdef TCPTransport transport = TCPTransport.new(loop, protocol, None, None, context)
    try:
        transport._open(fd)
    except BaseException:
        # libuv has not taken the fd: closing the handle leaves it alone,
        # and frees the transport without an unclosed-resource warning.
        transport._close()
        raise
    transport._init_protocol()
