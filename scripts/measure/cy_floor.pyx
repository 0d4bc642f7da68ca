# cython: language_level=3, boundscheck=False, wraparound=False
"""The floor of a compiled NBD loop calling read/writev directly: a measurement, not blkback.

What floor_server.py does per request (one receive into a staging buffer, the header's
fields, one copy, one reply), in C through Cython, with the GIL released only around the
system calls. docs/data-path.md section 6 compares its user time per request with the
interpreted floor's, blkback's and nbdkit's. Build and run: see cy_floor_server.py.
"""
from libc.string cimport memcpy, memmove
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "sys/uio.h" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)
cdef extern from "unistd.h" nogil:
    ssize_t read(int fd, void *buf, size_t count)
cdef extern from "endian.h" nogil:
    uint64_t be64toh(uint64_t)
    uint32_t be32toh(uint32_t)
    uint16_t be16toh(uint16_t)
    uint64_t htobe64(uint64_t)
    uint32_t htobe32(uint32_t)
    uint16_t htobe16(uint16_t)

cdef inline uint16_t ld16(const uint8_t* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return be16toh(v)
cdef inline uint32_t ld32(const uint8_t* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return be32toh(v)
cdef inline uint64_t ld64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return be64toh(v)
cdef inline void st16(uint8_t* p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)
cdef inline void st32(uint8_t* p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)
cdef inline void st64(uint8_t* p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)

def loop(int fd, unsigned char[::1] staging, unsigned char[::1] mem, unsigned char[::1] reply,
         Py_ssize_t end, bint structured):
    cdef uint8_t* st = &staging[0]
    cdef uint8_t* m = &mem[0]
    cdef uint8_t* rb = &reply[0]
    cdef Py_ssize_t cap = staging.shape[0]
    cdef Py_ssize_t start = 0, n, staged, got, hl
    cdef uint16_t cmd
    cdef uint64_t cookie, offset
    cdef uint32_t length
    cdef uint8_t hdr[32]
    cdef iovec iov[2]
    while True:
        if end - start < 28:
            if start:
                memmove(st, st + start, end - start)
                end -= start
                start = 0
            with nogil:
                n = read(fd, st + end, cap - end)
            if n <= 0:
                return
            end += n
            continue
        cmd = ld16(st + start + 6)
        cookie = ld64(st + start + 8)
        offset = ld64(st + start + 16)
        length = ld32(st + start + 24)
        start += 28
        if cmd == 0:
            if structured:
                st32(hdr, 0x668e33ef); st16(hdr + 4, 1); st16(hdr + 6, 1)
                st64(hdr + 8, cookie); st32(hdr + 16, length + 8); st64(hdr + 20, offset)
                hl = 28
            else:
                st32(hdr, 0x67446698); st32(hdr + 4, 0); st64(hdr + 8, cookie)
                hl = 16
            memcpy(rb, m + offset, length)
            iov[0].iov_base = hdr
            iov[0].iov_len = hl
            iov[1].iov_base = rb
            iov[1].iov_len = length
            with nogil:
                n = writev(fd, iov, 2)
        elif cmd == 1:
            staged = min(end - start, <Py_ssize_t>length)
            memcpy(m + offset, st + start, staged)
            got = staged
            while got < length:
                with nogil:
                    n = read(fd, m + offset + got, length - got)
                if n <= 0:
                    return
                got += n
            start += staged
            if start >= end:
                start = end = 0
            st32(hdr, 0x67446698); st32(hdr + 4, 0); st64(hdr + 8, cookie)
            iov[0].iov_base = hdr
            iov[0].iov_len = 16
            with nogil:
                n = writev(fd, iov, 1)
        elif cmd == 2:
            return
        else:
            st32(hdr, 0x67446698); st32(hdr + 4, 0); st64(hdr + 8, cookie)
            iov[0].iov_base = hdr
            iov[0].iov_len = 16
            with nogil:
                n = writev(fd, iov, 1)
