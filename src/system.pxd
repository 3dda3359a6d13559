# Linux and libc declarations the dispatcher needs and Cython's bundled
# posix/*.pxd do not provide (sockets with ancillary data, epoll, memfd).
# Logic lives in dispatch.pyx; this file only says what the C side looks like.

from libc.stdint cimport uint32_t, uint64_t
from posix.types cimport off_t
from posix.uio cimport iovec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct sockaddr:
        pass

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    # Macros in C; declared as functions so Cython calls them as such.
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_LEN(size_t length)
    size_t CMSG_SPACE(size_t length)

    int SOL_SOCKET
    int SCM_RIGHTS
    int SOCK_NONBLOCK
    int SOCK_CLOEXEC
    int MSG_DONTWAIT
    int MSG_NOSIGNAL
    int MSG_CTRUNC
    int MSG_TRUNC
    int MSG_CMSG_CLOEXEC

    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    int sendmmsg(int fd, mmsghdr *vmessages, unsigned int vlen, int flags)
    int recvmmsg(int fd, mmsghdr *vmessages, unsigned int vlen, int flags,
                 void *timeout)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)


cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_TCP


cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_INFO

    struct tcp_info:
        unsigned char tcpi_state
        uint32_t tcpi_unacked   # on a listener: connections in its accept queue


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int EPOLLIN
    int EPOLLERR
    int EPOLLHUP
    int EPOLL_CTL_ADD
    int EPOLL_CTL_MOD
    int EPOLL_CTL_DEL
    int EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/mman.h>" nogil:
    int PROT_READ
    int PROT_WRITE
    int MAP_SHARED
    void *MAP_FAILED
    void *mmap(void *addr, size_t length, int prot, int flags, int fd,
               off_t offset)
    int munmap(void *addr, size_t length)


cdef extern from "atomics.h" nogil:
    uint32_t atomic_load_u32(uint32_t *p)
    void atomic_store_u32(uint32_t *p, uint32_t v)
    uint32_t atomic_exchange_u32(uint32_t *p, uint32_t v)
    uint32_t atomic_add_u32(uint32_t *p, uint32_t v)
    uint32_t atomic_sub_u32(uint32_t *p, uint32_t v)
    bint atomic_cas_u32(uint32_t *p, uint32_t expected, uint32_t desired)
    uint64_t relaxed_load_u64(uint64_t *p)
    void relaxed_store_u64(uint64_t *p, uint64_t v)
