"""Real NBD clients against a running ``blkback serve`` (issue 3)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from support import need_tool, run

MiB = 2**20


def test_nbdinfo_reports_size_flags_block_sizes_and_allocation(serve) -> None:  # type: ignore[no-untyped-def]
    need_tool("nbdinfo")
    s = serve("disk=memory:64M", "ro=null:1G,readonly")
    info = json.loads(run(["nbdinfo", "--json", s.uri()]).stdout)
    exp = info["exports"][0]
    assert exp["export-size"] == 64 * MiB
    assert exp["is_read_only"] is False
    assert exp["can_flush"] is True
    assert exp["can_trim"] is True
    assert exp["can_zero"] is True
    assert exp["can_multi_conn"] is True
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 32 * MiB
    assert "base:allocation" in exp["contexts"]
    assert info["protocol"] == "newstyle-fixed"
    ro = json.loads(run(["nbdinfo", "--json", s.uri("ro")]).stdout)["exports"][0]
    assert ro["is_read_only"] is True
    assert ro["export-size"] == 2**30
    listing = run(["nbdinfo", "--list", "--json", s.uri()]).stdout
    assert {e["export-name"] for e in json.loads(listing)["exports"]} == {"disk", "ro"}


def test_nbdinfo_map_sees_holes_and_data(serve) -> None:  # type: ignore[no-untyped-def]
    need_tool("nbdinfo", "qemu-io")
    s = serve("disk=memory:16M")
    run(["qemu-io", "-f", "raw", s.uri(), "-c", "write -P 0x11 1M 1M"])
    extents = json.loads(run(["nbdinfo", "--map", "--json", s.uri()]).stdout)
    data = [e for e in extents if e["type"] & 1 == 0]
    assert any(e["offset"] <= MiB and e["offset"] + e["length"] >= 2 * MiB for e in data)
    assert any(e["type"] == 3 for e in extents)  # hole + zero elsewhere


def test_qemu_img_info_and_qemu_io_patterns(serve) -> None:  # type: ignore[no-untyped-def]
    need_tool("qemu-img", "qemu-io")
    s = serve("disk=memory:32M")
    out = run(["qemu-img", "info", "--output=json", s.uri()]).stdout
    assert json.loads(out)["virtual-size"] == 32 * MiB
    run(
        [
            "qemu-io", "-f", "raw", s.uri(),
            "-c", "write -P 0xa5 0 1M",
            "-c", "write -P 0x5a 3M 12k",
            "-c", "write -f -P 0x33 8M 64k",  # FUA
            "-c", "flush",
            "-c", "read -P 0xa5 0 1M",
            "-c", "read -P 0x5a 3M 12k",
            "-c", "read -P 0x33 8M 64k",
            "-c", "read -P 0 16M 1M",
        ]
    )  # fmt: skip
    bad = subprocess.run(
        ["qemu-io", "-f", "raw", s.uri(), "-c", "read -P 0x77 0 4k"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Pattern verification failed" in bad.stdout + bad.stderr  # the check can fail


def test_qemu_img_convert_and_compare_round_trip(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    need_tool("qemu-img")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB) + bytes(8 * MiB) + os.urandom(3 * MiB + 512))
    s = serve(f"disk=memory:{src.stat().st_size}")
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), s.uri()])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), s.uri()])
    back = tmp_path / "back.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri(), str(back)])
    assert back.read_bytes() == src.read_bytes()
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(src.stat().st_size))
    differ = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(other), s.uri()],
        capture_output=True,
        timeout=60,
    )
    assert differ.returncode == 1


def test_nbdcopy_in_and_out_with_checksums(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    need_tool("nbdcopy")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(48 * MiB))
    s = serve("disk=memory:48M")
    run(["nbdcopy", str(src), s.uri()])
    dst = tmp_path / "dst.img"
    run(["nbdcopy", "-C", "4", s.uri(), str(dst)])
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    dst2 = tmp_path / "dst2.img"
    run(["nbdcopy", "--no-extents", s.uri(), str(dst2)])
    assert dst2.read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    ("params", "extra"),
    [
        ((), ()),  # defaults: groups of requests, busy polling
        (("max_buffer_pages=0",), ("--poll-us", "0")),  # every request allocates; no polling
    ],
    ids=["default", "nopool-nopoll"],
)
def test_fio_verify_on_several_connections(  # type: ignore[no-untyped-def]
    serve, tmp_path: Path, params: tuple[str, ...], extra: tuple[str, ...]
) -> None:
    need_tool("fio")
    s = serve("disk=memory:64M", params=params, extra=extra)
    res = run(
        [
            "fio", "--name=v", "--ioengine=nbd", f"--uri={s.uri()}", "--rw=randwrite",
            "--bs=4k", "--bsrange=4k-128k", "--iodepth=16", "--numjobs=4", "--size=16M",
            "--offset_increment=16M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
            "--output-format=json",
        ],
        timeout=300,
        cwd=tmp_path,  # fio leaves its verify state files in the working directory
    )  # fmt: skip
    jobs = json.loads(res.stdout[res.stdout.index("{") :])["jobs"]
    assert len(jobs) == 4
    assert all(j["error"] == 0 for j in jobs)
    assert all(j["write"]["io_bytes"] >= 16 * MiB for j in jobs)
    stats = s.stats()
    assert all(r["in_flight_pages"] == 0 for d in stats["devices"] for r in d["rings"])


def test_file_backend_round_trip_and_flush(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    need_tool("qemu-io")
    img = tmp_path / "disk.img"
    s = serve(f"disk=file:{img}:16M")
    run(["qemu-io", "-f", "raw", s.uri(), "-c", "write -P 0x42 4k 1M", "-c", "flush"])
    data = img.read_bytes()
    assert len(data) == 16 * MiB
    assert data[4096 : 4096 + MiB] == b"\x42" * MiB
    assert data[:4096] == bytes(4096)
