"""``blkback serve`` and ``ctl`` as a user meets them: defaults, errors, shutdown, metrics."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import blkback_cmd, child_env, need_tool, run, wait_for_socket


def _serve_fails(*args: str, status: int = 2) -> str:
    """Run a serve that must fail with ``status`` (2: usage error, 1: runtime failure)."""
    res = subprocess.run(
        blkback_cmd("serve", *args),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert res.returncode == status, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr  # one clear line
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--export", "disk=memory:12Q"), "size"),
        (("--export", "disk=file:/nonexistent/dir/x.img"), "x.img"),
        (("--export", "nodisk"), "NAME=SPEC"),
        (("--export", "a=tape:1G"), "tape"),
        (("--param", "max_buffer_pages=-1"), "max_buffer_pages"),
        (("--param", "wibble=1"), "unknown parameter"),
        (("--listen", "udp:1.2.3.4:5"), "unix:PATH or tcp:HOST:PORT"),
        (("--listen", "tcp:127.0.0.1:99999"), "port"),
        (("--export", "a=memory:1M", "--export", "a=memory:1M"), "defined twice"),
        (("--poll-us", "-1"), "--poll-us"),
        (("--export", "disk=memory:1M,delay=10"), "bad delay '10': give a unit"),
        (("--export", "disk=memory:1M,readonly=maybe"), "readonly= takes yes/no"),
    ],
)
def test_bad_arguments_end_with_one_clear_line(
    tmp_path: Path, args: tuple[str, ...], fragment: str
) -> None:
    line = _serve_fails("--listen", f"unix:{tmp_path}/s", "--control", f"{tmp_path}/c", *args)
    assert fragment in line
    assert line.startswith("blkback serve: error:")


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _serve_fails(
            "--listen", f"tcp:127.0.0.1:{port}", "--control", f"{tmp_path}/c", status=1
        )
    assert "address in use" in line


def test_default_serve_uses_tcp_10809_and_prints_uri(tmp_path: Path) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 10809)) == 0:
            pytest.skip("something already listens on 127.0.0.1:10809")
    control = tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        blkback_cmd("serve", "--control", str(control)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "nbd://127.0.0.1/disk"
        assert proc.stdout.readline().strip() == f"control: {control}"
        need_tool("nbdinfo")
        info = json.loads(run(["nbdinfo", "--json", "nbd://127.0.0.1/disk"]).stdout)
        assert info["exports"][0]["export-size"] == 2**30
        assert oct(control.stat().st_mode & 0o777) == "0o600"
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not control.exists()


def test_sigterm_finishes_in_flight_io_and_cleans_up(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    need_tool("qemu-io")
    img = tmp_path / "slow.img"
    s = serve(f"disk=file:{img}:8M,delay-write=300ms")
    writer = subprocess.Popen(
        ["qemu-io", "-f", "raw", s.uri(), "-c", "aio_write -P 0x61 0 64k", "-c", "aio_flush"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Stop the server while the write sits in the delay filter.
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(r["in_flight_pages"] for r in s.rings()):
        time.sleep(0.01)
    assert s.stop() == 0
    out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, out + err
    assert img.read_bytes()[: 64 * 1024] == b"\x61" * 64 * 1024  # the write was finished
    assert not Path(s.sock).exists()
    assert not Path(s.control).exists()


def test_metrics_endpoint(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    control = tmp_path / "ctl.sock"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    proc = subprocess.Popen(
        blkback_cmd(
            "serve", "--listen", f"unix:{sock}", "--control", str(control),
            "--metrics", f"127.0.0.1:{port}", "--export", "vol=memory:8M",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )  # fmt: skip
    try:
        wait_for_socket(str(control), proc)
        need_tool("qemu-io")
        run(["qemu-io", "-f", "raw", f"nbd+unix:///vol?socket={sock}", "-c", "write 0 1M"])
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        parsed = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert parsed["blkback_pool_pages"].type == "gauge"
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in parsed.values()
            for s in f.samples
        }
        assert samples[("blkback_squeezes_total", (("device", "vol"),))] == 0
        assert samples[("blkback_param", (("name", "max_buffer_pages"),))] == 1024
        # qemu-io has gone: its ring's counters live on in the retired totals.
        assert samples[("blkback_retired_rings_total", ())] == 1
        assert samples[("blkback_retired_pages_allocated_total", ())] >= (1 << 20) // 4096
        assert samples[("process_resident_memory_bytes", ())] > 0
        assert samples[("process_open_fds", ())] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
