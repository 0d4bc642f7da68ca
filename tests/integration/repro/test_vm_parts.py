"""The pure parts of ``--guests vm``: the initramfs archive, QEMU's command line, the guests'
output parsers. No root, no QEMU: the archive is read back by this test's own newc parser.
"""

from __future__ import annotations

import gzip
import os
import stat
import time
from pathlib import Path

from blkback.repro.vm import DISKS_PER_BRIDGE, nbd_uri, qemu_argv
from blkback.repro.vmguests import parse_bursts, split
from blkback.repro.vmimage import GuestImage, image_key, initramfs, prune
from blkback.repro.vmoverhead import parse_loop


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, contents, rdev) of a cpio newc archive."""
    out = {}
    i = 0
    while True:
        assert data[i : i + 6] == b"070701"
        f = [int(data[i + 6 + 8 * k : i + 14 + 8 * k], 16) for k in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = data[i + 110 : i + 110 + namesize - 1].decode()
        i += 110 + namesize
        i += -i % 4
        body = data[i : i + size]
        i += size
        i += -i % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (rmaj, rmin))


def test_initramfs_holds_files_dirs_and_console(tmp_path: Path) -> None:
    init = tmp_path / "init"
    init.write_text("#!/bin/busybox sh\necho hi\n")
    init.chmod(0o755)
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF" + bytes(range(7)))  # length not a multiple of 4
    entries = _read_newc(gzip.decompress(initramfs({"/init": init, "/usr/lib/x/lib.so": lib})))
    assert entries["init"][1] == init.read_bytes()
    assert entries["init"][0] & 0o777 == 0o755 and stat.S_ISREG(entries["init"][0])
    assert entries["usr/lib/x/lib.so"][1] == lib.read_bytes()
    for d in ("usr", "usr/lib", "usr/lib/x", "proc", "sys", "dev", "tmp"):
        assert stat.S_ISDIR(entries[d][0]), d
    mode, _, rdev = entries["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)


def test_image_key_changes_with_every_input(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_text("one")
    base = image_key("linux-image-x", "1", {"/init": a})
    assert image_key("linux-image-x", "2", {"/init": a}) != base
    assert image_key("linux-image-y", "1", {"/init": a}) != base
    assert image_key("linux-image-x", "1", {"/sbin/init": a}) != base
    a.write_text("two")
    assert image_key("linux-image-x", "1", {"/init": a}) != base


def test_prune_keeps_images_another_checkout_used_lately(tmp_path: Path) -> None:
    """Two checkouts have different keys: a build prunes only images unused for long."""
    for name in ("mine", "recent", "stale", "build-xyz"):
        (tmp_path / name).mkdir()
    old = time.time() - 3 * 86400
    for name in ("mine", "stale", "build-xyz"):
        os.utime(tmp_path / name, (old, old))
    assert prune(tmp_path, keep="mine") == ["stale"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build-xyz", "mine", "recent"]


def test_qemu_argv_puts_disks_behind_bridges(tmp_path: Path) -> None:
    image = GuestImage(tmp_path / "k", tmp_path / "i", "linux-image-x", "1", "key")
    uris = [nbd_uri("/run/s.sock", f"vol{i}") for i in range(40)]
    argv = qemu_argv(
        image,
        uris,
        accel="tcg",
        memory_mib=256,
        console_log=tmp_path / "c",
        control_sock=tmp_path / "s",
        serials=[f"s{i}" for i in range(40)],
    )
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    bridges = [d for d in devices if d.startswith("pci-bridge")]
    disks = [d for d in devices if d.startswith("virtio-blk-pci")]
    assert len(bridges) == 2 and len(disks) == 40
    assert "bus=br0,addr=1f.0" in disks[DISKS_PER_BRIDGE - 1]  # slots are hex
    assert "bus=br1,addr=0.0" in disks[DISKS_PER_BRIDGE] and disks[39].endswith("serial=s39")
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert (
        drives[7] == "file=nbd+unix:///vol7?socket=/run/s.sock,if=none,id=d7,format=raw,cache=none"
    )
    assert "blkback.disks=40" in argv[argv.index("-append") + 1]
    assert argv[argv.index("-machine") + 1] == "pc,accel=tcg"


def test_split_is_even_and_complete() -> None:
    names = [f"v{i}" for i in range(65)]
    groups = split(names, 2)
    assert [len(g) for g in groups] == [33, 32]
    assert [n for g in groups for n in g] == names
    assert split(names[:1], 4) == [["v0"]]


def test_guest_output_parsers() -> None:
    assert parse_bursts(["burst 3 100 125", "noise", "burst 0 7 8", "bursts 2"]) == [
        (3, 0.25),
        (0, 0.01),
    ]
    out = [
        "131072+0 records in",
        "131072+0 records out",
        "536870912 bytes (537 MB, 512 MiB) copied, 12.5 s, 42.9 MB/s",
        "ddsync 100.0 112.5 113.0",
        "131072+0 records in",
        "131072+0 records out",
        "536870912 bytes (537 MB, 512 MiB) copied, 1.3 s, 413 MB/s",
        "ddsync 200.0 201.3 202.0",
    ]
    runs = parse_loop(out, 536870912)
    assert len(runs) == 2
    assert runs[0]["dd_line"].endswith("42.9 MB/s") and runs[0]["dd_mb_s"] == 42.9
    assert abs(runs[0]["total_s"] - 13.0) < 1e-9 and abs(runs[0]["sync_s"] - 0.5) < 1e-9
    assert abs(runs[1]["mb_s"] - 536.870912 / 2.0) < 1e-6
