"""What ``blkback serve -v`` / ``-vv`` tells an operator, with real clients."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from support import Served, need_tool, run

# A client that turns libnbd's own checks off, so that the server answers the errors.
LIBNBD_READ_ONLY_WRITES = """
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
for _ in range(3):
    try:
        h.pwrite(b"x" * 4096, 0)
    except nbd.Error:
        pass
h.shutdown()
"""


def test_v_after_serve_logs_connections_refusals_errors_and_squeezes(
    serve: Callable[..., Served],
) -> None:
    need_tool("qemu-io", "nbdinfo")
    s = serve("disk=memory:8M", "ro=memory:1M,readonly", extra=("-v",))
    run(["qemu-io", "-f", "raw", s.uri("disk"), "-c", "write 0 64k"])
    refused = subprocess.run(["nbdinfo", s.uri("nope")], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    run(["/usr/bin/python3", "-c", LIBNBD_READ_ONLY_WRITES, s.uri("ro")])
    s.ctl("pressure", "--level", "medium")
    assert s.stop() == 0
    err = s.stderr_text
    assert "connected to export 'disk' (no TLS" in err
    assert "closed (export 'disk': 0 reads, 1 writes" in err
    assert "refused unknown export 'nope' (exports: disk, ro)" in err
    assert "write 0+4096 answered EPERM" in err
    assert "squeeze: device 'disk', level medium (from manual)" in err
    assert "DEBUG" not in err


def test_vv_logs_every_request(serve: Callable[..., Served]) -> None:
    need_tool("qemu-io")
    s = serve("disk=memory:8M", extra=("-vv",))
    run(["qemu-io", "-f", "raw", s.uri(), "-c", "write 8k 64k", "-c", "read 4k 4k"])
    assert s.stop() == 0
    assert ": write 8192+65536 [fua]\n" in s.stderr_text  # qemu-io writes with FUA
    assert ": read 4096+4096\n" in s.stderr_text


def test_default_verbosity_keeps_connections_quiet(serve: Callable[..., Served]) -> None:
    need_tool("qemu-io")
    s = serve("disk=memory:8M")
    run(["qemu-io", "-f", "raw", s.uri(), "-c", "write 0 4k"])
    assert s.stop() == 0
    assert "connected to export" not in s.stderr_text
    assert "INFO" not in s.stderr_text


def test_log_stats_without_v_says_where_its_lines_went(serve: Callable[..., Served]) -> None:
    s = serve("disk=memory:8M", params=("log_stats=1",))
    assert s.stop() == 0
    assert "log_stats is on, but its lines are INFO: they show with 'serve -v'" in s.stderr_text
