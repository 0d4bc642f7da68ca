"""The seed's guest filesystem: ext4 on a real kernel block device backed by blkback.

nbdfuse exposes the export as a file, a loop device turns it into a block device, and the
kernel's ext4 reads and writes it through our server. Everything is torn down in ``finally``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from support import need_root, need_tool, run, wait_until


def _mounted(path: Path) -> bool:
    return any(
        line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines()
    )


def test_ext4_on_loop_on_nbdfuse(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    need_root("loop devices and mounts")
    need_tool("nbdfuse", "losetup", "mkfs.ext4", "fsck.ext4", "fusermount3")
    s = serve("disk=memory:256M")
    fuse_dir = tmp_path / "fuse"
    mnt = tmp_path / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    fuse = subprocess.Popen(
        ["nbdfuse", str(fuse_dir), "--unix", s.sock],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    loop = ""
    try:
        wait_until(lambda: (fuse_dir / "nbd").exists(), 10, "nbdfuse to expose the export")
        loop = run(["losetup", "-f", "--show", str(fuse_dir / "nbd")]).stdout.strip()
        run(["mkfs.ext4", "-q", "-F", loop])
        run(["mount", loop, str(mnt)])
        files = {f"f{i}.bin": os.urandom(1 << 20 + (i % 3)) for i in range(12)}
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        run(["sync"])
        run(["umount", str(mnt)])
        # Drop the loop device's page cache so that the reads below go to the server.
        run(["blockdev", "--flushbufs", loop])
        run(["fsck.ext4", "-f", "-n", loop])
        run(["mount", "-o", "ro", loop, str(mnt)])
        for name, data in files.items():
            got = (mnt / name).read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
        rings = s.rings()
        assert rings, "nbdfuse holds a connection"
        assert sum(r["requests"]["wr"] for r in rings) > 0
        assert sum(r["pages_allocated"] for r in rings) > 0
    finally:
        if _mounted(mnt):
            subprocess.run(["umount", str(mnt)], check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], check=False, capture_output=True)
        try:
            fuse.wait(10)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
        if fuse.stderr is not None:
            fuse.stderr.close()
    assert not _mounted(mnt)
