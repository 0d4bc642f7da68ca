"""Backends over a file descriptor: ``file:`` (regular files, block devices) and ``memory:``.

Both do their I/O with ``os.preadv``/``os.pwritev`` at explicit offsets: the calls release
the GIL, and since nothing uses the file position, any number of threads can share the
descriptors without a lock. ``memory:`` is an anonymous ``memfd`` (tmpfs), so it gets holes,
``SEEK_HOLE`` and hole punching from the kernel for free: a never-written or trimmed page
costs no memory and reads as zeroes.

O_DIRECT (``file:`` only). A second descriptor is opened with ``O_DIRECT``; a request whose
offset and buffer lengths are multiples of 4 KiB tries it first. Checking the buffers'
*addresses* in Python costs ~0.5 µs per page (ctypes), more than the check saves, so we try
optimistically instead: the kernel rejects a misaligned direct request with EINVAL *before*
any I/O, and we then redo it through the page cache. The server's buffers are page-aligned
pool pages, so in practice direct requests succeed. If a filesystem accepts the O_DIRECT
``open`` but refuses direct requests whose buffers are aligned (checked, on that rare path
only), direct I/O is switched off after a few refusals.
The kernel keeps the two descriptors coherent: a direct read first writes back dirty cached
pages of its range, a direct write invalidates them.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Final

from blkback.errors import ConfigError, StorageIOError, UnsupportedError

from ._linux import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    UNSUPPORTED_ERRNOS,
    fallocate,
)
from .base import (
    HOLE,
    MAX_SIZE,
    ZERO,
    Capabilities,
    PlainDescriptor,
    buffers_length,
    check_read_range,
    check_write_range,
    format_size,
    os_error,
    refuse_readonly,
)

log = logging.getLogger(__name__)

#: Alignment demanded for O_DIRECT. 4 KiB satisfies every common logical block size.
DIRECT_ALIGN: Final = 4096
# preadv/pwritev refuse more than IOV_MAX buffers (EINVAL); a 32 MiB request of 4 KiB pages
# is 8192 buffers, so long lists go down in slices.
IOV_MAX: Final = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
# A filesystem that opens O_DIRECT but refuses this many direct requests before any succeeds
# does not really do O_DIRECT.
_DIRECT_REFUSALS_BEFORE_GIVING_UP: Final = 3
# Most runs one extents() call reports; the client asks again for the rest.
MAX_EXTENTS: Final = 1024
# Slow-path zeroing writes this many bytes per call, from one shared zero buffer.
_ZERO_CHUNK: Final = 1 << 20
_ZEROES: Final = memoryview(bytes(_ZERO_CHUNK))

IoCall = Callable[[int, list[memoryview], int], int]


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Return ``bufs`` without its first ``n`` bytes (after a short transfer)."""
    k = 0
    # `<=` also skips empty buffers, which would otherwise make a later call return 0.
    while k < len(bufs) and len(bufs[k]) <= n:
        n -= len(bufs[k])
        k += 1
    rest = bufs[k:]
    if n:
        rest[0] = rest[0][n:]
    return rest


def _aligned(offset: int, bufs: list[memoryview]) -> bool:
    if offset % DIRECT_ALIGN:
        return False
    return all(len(b) % DIRECT_ALIGN == 0 for b in bufs)


def _addresses_aligned(bufs: list[memoryview]) -> bool:
    """True if every buffer starts on a DIRECT_ALIGN boundary (False if unknowable)."""
    try:
        return all(
            ctypes.addressof(ctypes.c_char.from_buffer(b)) % DIRECT_ALIGN == 0
            for b in bufs
            if len(b)
        )
    except (TypeError, ValueError):  # read-only buffer: its address is not available
        return False


class FdStorage(Capabilities):
    """Storage over one file descriptor (and optionally a second, O_DIRECT one).

    Not built directly: use :func:`open_file` or :class:`MemoryStorage`.
    """

    kind = "fd"

    def __init__(
        self,
        fd: int,
        size: int,
        *,
        readonly: bool,
        direct_fd: int = -1,
        durable: bool = True,
        zero_always_punches: bool = False,
    ) -> None:
        """Wrap open descriptors; the storage owns them and closes them in :meth:`close`.

        Args:
            fd: Descriptor for buffered I/O, fallocate, lseek and fdatasync.
            size: Export size in bytes.
            readonly: Refuse every modifying request with EPERM.
            direct_fd: An O_DIRECT descriptor of the same file, or -1.
            durable: False when the data lives only in memory, so flush and FUA have
                nothing to do.
            zero_always_punches: Zero by punching holes even when the client asked for
                allocated zeroes (``memory:``: allocating zero pages only wastes RAM).
        """
        self._fd = fd
        self._direct_fd = direct_fd
        self._direct = direct_fd >= 0
        self._direct_ok = False
        self._direct_refusals = 0
        self._durable = durable
        self._zero_always_punches = zero_always_punches
        # What fallocate can do here, learnt on first use. Races are harmless: at worst two
        # threads both try an unsupported mode once.
        self._can_punch = True
        self._can_zero_range = True
        self._can_allocate = True
        self._can_seek_data = True
        self._dsync_flag = getattr(os, "RWF_DSYNC", 0) if durable else 0
        self._close_lock = threading.Lock()
        self._closed = False

        self.size = size
        # One storage object (one inode) serves every connection of the export, and
        # fdatasync covers the inode whichever descriptor wrote: FLUSH on one connection
        # covers writes made on all of them, as CAN_MULTI_CONN requires.
        self.set_capabilities(readonly=readonly, inline=False)

    # -- data path -------------------------------------------------------------------------

    def _run(
        self,
        call: IoCall,
        bufs: list[memoryview],
        offset: int,
        what: str,
        *,
        allow_direct: bool = True,
    ) -> None:
        """Transfer all of ``bufs`` at ``offset`` with ``call`` (``os.preadv``-like).

        Loops over short transfers and IOV_MAX-sized slices; goes direct when aligned.
        """
        direct = allow_direct and self._direct and _aligned(offset, bufs)
        while bufs:
            batch = bufs[:IOV_MAX] if len(bufs) > IOV_MAX else bufs
            if direct:
                try:
                    n = call(self._direct_fd, batch, offset)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # Misaligned buffer address, or a filesystem that only pretends to do
                    # O_DIRECT: nothing was transferred, redo it through the page cache.
                    self._direct_refused(batch)
                    direct = False
                    continue
                self._direct_ok = True
            else:
                n = call(self._fd, batch, offset)
            if n <= 0:
                raise StorageIOError(f"{what}: unexpected end of file at offset {offset}")
            offset += n
            bufs = _advance(bufs, n)
            if n % DIRECT_ALIGN:
                direct = False  # the rest starts mid-block

    def _direct_refused(self, bufs: list[memoryview]) -> None:
        # Only a refusal of well-aligned buffers says something about the filesystem; the
        # (slow) address check runs on this rare path only.
        if self._direct_ok or not _addresses_aligned(bufs):
            return
        self._direct_refusals += 1
        if self._direct_refusals >= _DIRECT_REFUSALS_BEFORE_GIVING_UP:
            log.info("%r: the filesystem refuses O_DIRECT requests; using the page cache", self)
            self._direct = False

    @property
    def direct_active(self) -> bool:
        """True while aligned requests go through the O_DIRECT descriptor."""
        return self._direct

    def preadv(self, bufs: list[memoryview], offset: int) -> None:
        """Read into ``bufs`` from ``offset``; holes read as zeroes.

        Raises:
            InvalidRequestError: The range is outside the export.
            StorageIOError: The read failed.
        """
        length = buffers_length(bufs)
        check_read_range(self.size, offset, length, "read")
        if not length:
            return
        try:
            self._run(os.preadv, bufs, offset, "read")
        except OSError as exc:
            raise os_error(exc, f"read of {length} bytes at {offset}") from exc

    def pwritev(self, bufs: list[memoryview], offset: int, fua: bool) -> None:
        """Write ``bufs`` at ``offset``; with ``fua``, durable on return (RWF_DSYNC).

        Raises:
            ReadOnlyError: The export is read-only.
            NoSpaceError: Past the end, or the filesystem is full.
            StorageIOError: The write failed.
        """
        refuse_readonly(self.readonly, "write")
        length = buffers_length(bufs)
        check_write_range(self.size, offset, length, "write")
        if not length:
            return
        flags = self._dsync_flag if fua else 0
        try:
            if flags:
                try:
                    self._run(_pwritev_flags(flags), bufs, offset, "write")
                    return
                except OSError as exc:
                    if exc.errno not in UNSUPPORTED_ERRNOS:
                        raise
                    # An old kernel or odd filesystem without RWF_DSYNC: rewrite (idempotent)
                    # then fdatasync, and stop trying the flag.
                    self._dsync_flag = 0
            self._run(os.pwritev, bufs, offset, "write")
            if fua:
                self._sync()
        except OSError as exc:
            raise os_error(exc, f"write of {length} bytes at {offset}") from exc

    def _sync(self) -> None:
        if self._durable:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        """``fdatasync`` the file (a no-op for ``memory:``).

        Raises:
            StorageIOError: Writeback failed.
        """
        try:
            self._sync()
        except OSError as exc:
            raise os_error(exc, "flush") from exc

    # -- trim / zero -------------------------------------------------------------------------

    def _punch(self, offset: int, length: int) -> bool:
        """Punch a hole; False if the filesystem cannot (nothing changed)."""
        if not self._can_punch:
            return False
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in UNSUPPORTED_ERRNOS:
                raise
            self._can_punch = False
            return False
        return True

    def _zero_range(self, offset: int, length: int) -> bool:
        """FALLOC_FL_ZERO_RANGE (allocated zeroes); False if unsupported."""
        if not self._can_zero_range:
            return False
        try:
            fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in UNSUPPORTED_ERRNOS:
                raise
            self._can_zero_range = False
            return False
        return True

    def _punch_and_allocate(self, offset: int, length: int) -> bool:
        """Allocated zeroes where ZERO_RANGE is missing (tmpfs): punch, then allocate."""
        if not (self._can_allocate and self._punch(offset, length)):
            return False
        try:
            fallocate(self._fd, FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in UNSUPPORTED_ERRNOS:
                raise
            # The range already reads as zeroes (a hole); only the allocation is missing.
            self._can_allocate = False
        return True

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Punch a hole over the range (a no-op where the filesystem cannot).

        Raises:
            ReadOnlyError: The export is read-only.
            InvalidRequestError: The range is outside the export.
            StorageIOError: The filesystem failed.
        """
        refuse_readonly(self.readonly, "trim")
        check_read_range(self.size, offset, length, "trim")
        if not length:
            return
        try:
            self._punch(offset, length)
            if fua:
                self._sync()
        except OSError as exc:
            raise os_error(exc, f"trim of {length} bytes at {offset}") from exc

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool) -> None:
        """Make the range read as zeroes, by the cheapest means allowed.

        Order: punch a hole (if ``may_trim``, or always for ``memory:``); FALLOC_FL_ZERO_RANGE;
        punch then allocate; and only then writing zero buffers, which is not fast, so
        ``fast_only`` refuses it with ENOTSUP.

        Raises:
            ReadOnlyError: The export is read-only.
            NoSpaceError: Past the end, or no space to allocate.
            UnsupportedError: ``fast_only`` and only the slow path is left.
            StorageIOError: The filesystem failed.
        """
        refuse_readonly(self.readonly, "zero")
        check_write_range(self.size, offset, length, "zero")
        if not length:
            return
        try:
            done = (
                ((may_trim or self._zero_always_punches) and self._punch(offset, length))
                or self._zero_range(offset, length)
                or self._punch_and_allocate(offset, length)
            )
            if not done:
                if fast_only:
                    raise UnsupportedError("fast zero: this filesystem cannot zero quickly")
                self._write_zeroes(offset, length)
            if fua:
                self._sync()
        except OSError as exc:
            raise os_error(exc, f"zero of {length} bytes at {offset}") from exc

    def _write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            # Never direct: the shared zero buffer (a bytes object) is not page-aligned, and
            # its refusals would count against O_DIRECT on a fresh file.
            self._run(os.pwritev, [_ZEROES[:n]], offset, "zero", allow_direct=False)
            offset += n

    # -- hints and metadata ------------------------------------------------------------------

    def cache(self, offset: int, length: int) -> None:
        """``posix_fadvise(WILLNEED)``: start reading the range into the page cache.

        Raises:
            InvalidRequestError: The range is outside the export.
            StorageIOError: The call failed.
        """
        check_read_range(self.size, offset, length, "cache")
        if not length:
            return
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as exc:
            raise os_error(exc, f"cache of {length} bytes at {offset}") from exc

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Data and hole runs from ``SEEK_DATA``/``SEEK_HOLE``.

        Holes are reported as ``HOLE|ZERO``, data as 0 (it may contain zeroes, but we do not
        read it to find out). At most :data:`MAX_EXTENTS` runs are returned.

        Raises:
            InvalidRequestError: The range is outside the export.
            StorageIOError: ``lseek`` failed.
        """
        check_read_range(self.size, offset, length, "extents")
        end = offset + length
        runs: list[tuple[int, int]] = []
        pos = offset
        try:
            # lseek moves the shared file position, which no other call uses: safe.
            while pos < end and len(runs) < MAX_EXTENTS:
                if not self._can_seek_data:
                    runs.append((end - pos, 0))
                    break
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        data = end  # no data from pos to the end of the file
                    elif exc.errno in (errno.EINVAL, *UNSUPPORTED_ERRNOS):
                        # Block devices (and some filesystems) have no SEEK_DATA: all data.
                        self._can_seek_data = False
                        continue
                    else:
                        raise
                if data > pos:
                    stop = min(data, end)
                    runs.append((stop - pos, HOLE | ZERO))
                    pos = stop
                    continue
                hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
                stop = min(max(hole, pos + 1), end)
                runs.append((stop - pos, 0))
                pos = stop
        except OSError as exc:
            raise os_error(exc, f"extents of {length} bytes at {offset}") from exc
        return runs

    def close(self) -> None:
        """Close the descriptors (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            if self._direct_fd >= 0:
                os.close(self._direct_fd)
            os.close(self._fd)


def _pwritev_flags(flags: int) -> IoCall:
    def call(fd: int, bufs: list[memoryview], offset: int) -> int:
        return os.pwritev(fd, bufs, offset, flags)

    return call


class FileStorage(FdStorage):
    """A regular file or block device (``file:PATH[:SIZE]``)."""

    kind = "file"

    def __init__(
        self,
        path: str,
        fd: int,
        size: int,
        *,
        readonly: bool,
        direct_fd: int,
        block_device: bool,
    ) -> None:
        """Wrap descriptors opened by :func:`open_file` (use that instead)."""
        super().__init__(fd, size, readonly=readonly, direct_fd=direct_fd)
        self.path = path
        self.block_device = block_device

    def __repr__(self) -> str:
        notes = []
        if self.block_device:
            notes.append("block device")
        if self.direct_active:
            notes.append("O_DIRECT")
        if self.readonly:
            notes.append("readonly")
        extra = "".join(f", {n}" for n in notes)
        return f"file({self.path}, {format_size(self.size)}{extra})"


def open_file(path: str, size: int | None, *, readonly: bool, direct: str) -> FileStorage:
    """Open (or create sparse) the file behind ``file:PATH[:SIZE]``.

    * Missing file: created sparse at ``size``, which is then required.
    * Existing regular file: exported at its size. A larger ``size`` grows it (sparse);
      a smaller one is refused rather than truncating data.
    * Block device: exported at its size; ``size``, if given, must match.

    Args:
        path: File or block device path.
        size: Wanted size in bytes, or None to take the existing size.
        readonly: Open read-only; refuse modifying requests.
        direct: ``"auto"`` (O_DIRECT where the filesystem allows), ``"on"`` (required) or
            ``"off"``.

    Returns:
        The open storage.

    Raises:
        ConfigError: The file cannot be opened or created, or the size does not fit.
    """
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    created = False
    try:
        if readonly or size is None:
            fd = os.open(path, flags)
        else:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                fd = os.open(path, flags)
    except FileNotFoundError as exc:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise ConfigError(f"file:{path}: directory {parent} does not exist") from exc
        hint = "" if readonly else "; give a size to create it (file:PATH:SIZE)"
        raise ConfigError(f"file:{path}: the file does not exist{hint}") from exc
    except OSError as exc:
        raise ConfigError(f"file:{path}: cannot open: {exc.strerror}") from exc
    try:
        size = _settle_size(path, fd, size, readonly=readonly)
        direct_fd = _open_direct(path, flags, direct)
    except BaseException:
        os.close(fd)
        if created:
            os.unlink(path)  # leave nothing behind from a failed creation
        raise
    block = stat.S_ISBLK(os.fstat(fd).st_mode)
    return FileStorage(path, fd, size, readonly=readonly, direct_fd=direct_fd, block_device=block)


def _settle_size(path: str, fd: int, size: int | None, *, readonly: bool) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        actual = os.lseek(fd, 0, os.SEEK_END)
        if size is not None and size != actual:
            raise ConfigError(
                f"file:{path}: block device size is {actual} bytes, not {size}; omit the size"
            )
        return actual
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"file:{path}: not a regular file or block device")
    if size is None or size == st.st_size:
        return st.st_size
    if size < st.st_size:
        raise ConfigError(
            f"file:{path}: the file has {st.st_size} bytes; refusing to shrink it to {size}"
        )
    if readonly:
        raise ConfigError(
            f"file:{path}: the file has {st.st_size} bytes; cannot grow it to {size} read-only"
        )
    if size > MAX_SIZE:
        raise ConfigError(f"file:{path}: size {size} is too large")
    try:
        os.ftruncate(fd, size)  # grows sparse: no blocks allocated
    except OSError as exc:
        raise ConfigError(f"file:{path}: cannot grow to {size} bytes: {exc.strerror}") from exc
    return size


def _open_direct(path: str, flags: int, direct: str) -> int:
    if direct == "off":
        return -1
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        # tmpfs and some FUSE filesystems refuse O_DIRECT at open with EINVAL.
        if direct == "on":
            raise ConfigError(f"file:{path}: O_DIRECT refused: {exc.strerror}") from exc
        log.info("file:%s: no O_DIRECT (%s); using the page cache", path, exc.strerror)
        return -1


class MemoryStorage(FdStorage):
    """Sparse RAM disk (``memory:SIZE``) on an anonymous memfd.

    Pages are allocated on first write and freed by trim and zero; holes read as zeroes
    and cost nothing. The memory is charged to the process (shmem) like any tmpfs page.
    """

    kind = "memory"

    def direct_access(self) -> PlainDescriptor:
        """Plain ``preadv``/``pwritev`` on the memfd are the whole read and write."""
        return PlainDescriptor(self._fd)

    def __init__(self, size: int, *, readonly: bool = False) -> None:
        """Create the memfd.

        Args:
            size: Size in bytes (> 0).
            readonly: Refuse modifying requests (the disk then stays all zeroes).

        Raises:
            ConfigError: Bad size, or memfd_create failed.
        """
        if not 0 < size <= MAX_SIZE:
            raise ConfigError(f"memory: size must be between 1 and {MAX_SIZE} bytes")
        try:
            fd = os.memfd_create("blkback-memory", os.MFD_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"memory: memfd_create failed: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"memory: cannot size to {size} bytes: {exc.strerror}") from exc
        super().__init__(fd, size, readonly=readonly, durable=False, zero_always_punches=True)
        # Every call is a memory copy or a tmpfs page-table operation: never sleeps on a
        # device, so the server may run it on the connection thread.
        self.inline = True

    def __repr__(self) -> str:
        ro = ", readonly" if self.readonly else ""
        return f"memory({format_size(self.size)}{ro})"
