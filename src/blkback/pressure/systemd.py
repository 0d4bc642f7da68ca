"""systemd's memory-pressure protocol: watch what the service manager says to watch.

systemd >= 254 sets, for a service with ``MemoryPressureWatch=`` (on by default where the
memory controller is enabled)::

    MEMORY_PRESSURE_WATCH=/sys/fs/cgroup/system.slice/blkback.service/memory.pressure
    MEMORY_PRESSURE_WRITE=c29tZSAyMDAwMDAgMjAwMDAwMAA=     # base64 of "some 200000 2000000\\0"

and ``sd_event_add_memory_pressure`` (src/libsystemd/sd-event/sd-event.c) is how a daemon
honours it. :class:`SystemdWatchSource` does what that function does:

- ``$MEMORY_PRESSURE_WATCH`` empty or ``/dev/null``: watching is disabled on purpose (the
  unit said ``MemoryPressureWatch=off``); a relative or non-normalised path is refused.
- ``$MEMORY_PRESSURE_WRITE`` is base64; its decoded bytes (the trigger, NUL included) are
  written once to the opened file before it is polled. Without it the file is only read.
- A Unix socket is connected to and watched for ``POLLIN`` (its data read and dropped); a
  regular file must be on procfs or cgroup2 and is watched for ``POLLPRI`` (a PSI trigger);
  a FIFO or character device is watched for ``POLLIN``.

Every event is reported at one level, :data:`SYSTEMD_LEVEL` (``medium``): the protocol has a
single trigger chosen by the service manager, and xen-blkback's squeeze has a single level
too. In ``auto`` mode the monitor watches only this source when the variable is set, as
sd-event ignores its own defaults then.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import errno
import os
import select
import socket
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from blkback.core.policy import PressureLevel
from blkback.errors import EnvironmentProblem
from blkback.pressure.sources import Emit, Source, SourceEvent

ENV_WATCH = "MEMORY_PRESSURE_WATCH"
ENV_WRITE = "MEMORY_PRESSURE_WRITE"
SYSTEMD_LEVEL = PressureLevel.MEDIUM
PROC_SUPER_MAGIC = 0x9FA0
CGROUP2_SUPER_MAGIC = 0x63677270


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """What the service manager asked for: a path (``""``: disabled) and a trigger."""

    path: str
    trigger: bytes

    @property
    def disabled(self) -> bool:
        """Whether the service manager turned memory-pressure watching off."""
        return self.path in ("", "/dev/null")

    def describe(self) -> str:
        """The request in words: path and trigger text (a trailing NUL shown as ``\\0``)."""
        if self.disabled:
            return f"${ENV_WATCH}={self.path!r}: memory pressure watching disabled by the unit"
        if not self.trigger:
            return f"{self.path} (no trigger written)"
        text = self.trigger.rstrip(b"\0").decode(errors="replace")
        nul = "\\0" if self.trigger.endswith(b"\0") else ""
        return f'{self.path}, trigger "{text}{nul}"'


def watch_from_environ(environ: Mapping[str, str]) -> WatchSpec | None:
    """The watch of ``$MEMORY_PRESSURE_WATCH``/``$MEMORY_PRESSURE_WRITE``; None when unset.

    Raises:
        EnvironmentProblem: The path is relative or not normalised, or the trigger is not
            base64 (sd-event refuses both too).
    """
    path = environ.get(ENV_WATCH)
    if path is None:
        return None
    if path in ("", "/dev/null"):
        return WatchSpec(path, b"")
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise EnvironmentProblem(f"${ENV_WATCH} is not an absolute, normalised path: {path!r}")
    raw = "".join(environ.get(ENV_WRITE, "").split())  # unbase64mem skips whitespace
    try:
        trigger = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvironmentProblem(f"${ENV_WRITE} is not base64: {exc}") from None
    return WatchSpec(path, trigger)


def _fs_type(fd: int) -> int:
    """``fstatfs(fd).f_type`` (the first field of struct statfs on Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(struct.unpack_from("l", buf.raw)[0])


class SystemdWatchSource(Source):
    """The service manager's memory-pressure watch, as ``sd_event_add_memory_pressure``."""

    name = "systemd"
    reports_onset = True

    def __init__(self, spec: WatchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.events = 0
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self._mask = select.POLLPRI

    def open(self, now_ns: int, emit: Emit) -> None:
        super().open(now_ns, emit)
        spec = self.spec
        if spec.disabled:
            raise EnvironmentProblem(spec.describe())
        try:
            st = os.stat(spec.path)
        except OSError as exc:
            raise EnvironmentProblem(f"${ENV_WATCH}: {spec.path}: {exc.strerror}") from None
        try:
            if stat.S_ISSOCK(st.st_mode):
                self._open_socket()
            elif stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
                self._open_file(regular=stat.S_ISREG(st.st_mode))
            else:
                raise EnvironmentProblem(f"${ENV_WATCH}: {spec.path} is not a file or socket")
        except BaseException:
            self.close()
            raise
        self.detail = f"{spec.describe()} (from ${ENV_WATCH}/${ENV_WRITE}, level medium)"

    def _open_socket(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = sock
        try:
            sock.connect(self.spec.path)
        except OSError as exc:
            raise EnvironmentProblem(f"${ENV_WATCH}: {self.spec.path}: {exc.strerror}") from None
        sock.setblocking(False)
        if self.spec.trigger:
            sock.sendall(self.spec.trigger)
        self._fd = sock.fileno()
        self._mask = select.POLLIN

    def _open_file(self, *, regular: bool) -> None:
        path = self.spec.path
        mode = os.O_RDWR if self.spec.trigger else os.O_RDONLY
        try:
            fd = os.open(path, mode | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise EnvironmentProblem(f"${ENV_WATCH}: {path}: {exc.strerror}") from None
        self._fd = fd
        if regular:
            if _fs_type(fd) not in (PROC_SUPER_MAGIC, CGROUP2_SUPER_MAGIC):
                raise EnvironmentProblem(
                    f"${ENV_WATCH}: {path} is a regular file outside procfs and cgroup2 "
                    "(sd-event refuses it too)"
                )
            self._mask = select.POLLPRI
        else:
            self._mask = select.POLLIN
        if self.spec.trigger:
            try:
                os.write(fd, self.spec.trigger)
            except OSError as exc:
                hint = ""
                if exc.errno == errno.EINVAL:
                    hint = (
                        " (without CAP_SYS_RESOURCE a PSI trigger's window must be a "
                        "multiple of 2 s, and the write end in a NUL)"
                    )
                raise EnvironmentProblem(
                    f"{path}: the kernel refused ${ENV_WRITE} "
                    f"({self.spec.describe()}): {exc.strerror}{hint}"
                ) from None

    def fds(self) -> list[tuple[int, int]]:
        return [] if self._fd is None else [(self._fd, self._mask)]

    def handle(self, ready: dict[int, int], now_ns: int) -> None:
        revents = ready.get(self._fd, 0) if self._fd is not None else 0
        if not revents & (select.POLLPRI | select.POLLIN):
            return
        if self._mask == select.POLLIN:
            self._drain()
        self.events += 1
        self._emit(SourceEvent(self.name, SYSTEMD_LEVEL, now_ns))

    def _drain(self) -> None:
        """Read what a socket or FIFO sent (its content carries no meaning here)."""
        assert self._fd is not None
        while True:
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                return
            if not data:
                raise OSError(errno.EPIPE, "the pressure socket or FIFO was closed")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._sock = None
        self._fd = None

    def info(self) -> dict[str, object]:
        return {"detail": self.detail, "events": self.events, "path": self.spec.path}
