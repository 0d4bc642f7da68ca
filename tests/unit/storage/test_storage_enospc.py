"""A full filesystem must surface as NoSpaceError (ENOSPC), through the file backend."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from storage_helpers import PAGE, page_buffers

from blkback.errors import NoSpaceError
from blkback.storage import open_file

pytestmark = pytest.mark.root


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def test_full_filesystem_gives_no_space_error(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: loop-mounts a 4 MiB ext4 filesystem to fill it")
    for tool in ("mkfs.ext4", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    image = tmp_path / "tiny.ext4"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    _run("mkfs.ext4", "-q", "-F", str(image))
    dev = _run("losetup", "--find", "--show", str(image))
    mounted = False
    try:
        _run("mount", dev, str(mountpoint))
        mounted = True
        # a sparse 64 MiB file on a 4 MiB filesystem: the writes run out of blocks
        st = open_file(str(mountpoint / "big.img"), 64 << 20, readonly=False, direct="auto")
        try:
            _, bufs = page_buffers(256 * PAGE)
            for b in bufs:
                b[:] = b"\xee" * PAGE

            def fill_disk():
                for i in range(64):
                    st.pwritev(bufs, i << 20, fua=False)

            with pytest.raises(NoSpaceError) as info:
                fill_disk()
            assert isinstance(info.value.__cause__, OSError)
            assert info.value.errno == 28
            # ZERO_RANGE needs blocks too: also ENOSPC, not EIO
            with pytest.raises(NoSpaceError):
                st.zero(32 << 20, 16 << 20, may_trim=False, fast_only=False, fua=False)
        finally:
            st.close()
    finally:
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=True)
        subprocess.run(["losetup", "-d", dev], check=True)
