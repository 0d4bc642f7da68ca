"""systemd's memory-pressure protocol on real files and sockets.

The watch is armed on this host's real PSI file (``/proc/pressure/memory``) with the
trigger systemd passes, privileged and (with CAP_SYS_RESOURCE dropped by ``setpriv``)
unprivileged, where the kernel wants 2 s windows and a NUL-terminated write. Delivery is
shown end to end through a Unix socket watch (sd-event's other form): the server connects,
receives the trigger, and a byte from the "service manager" squeezes its devices.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import blkback_cmd, child_env, need_tool, wait_for_socket, wait_until

from blkback.core.policy import PressureLevel
from blkback.hostenv.cgroup import MemoryCgroup
from blkback.hostenv.hog import MemoryHog
from blkback.pressure.monitor import PressureMonitor

PSI = "/proc/pressure/memory"


def _b64(trigger: bytes) -> str:
    return base64.b64encode(trigger).decode()


@pytest.fixture
def psi() -> str:
    if not os.path.exists(PSI):
        pytest.skip(f"{PSI} is missing: kernel without PSI")
    return PSI


def _probe(env_extra: dict[str, str], *prefix: str) -> dict[str, object]:
    env = {**child_env(), **env_extra}
    res = subprocess.run(
        [*prefix, *blkback_cmd("pressure", "probe", "--json")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    statuses = {s["name"]: s for s in json.loads(res.stdout)["sources"]}
    return statuses["systemd"]  # type: ignore[no-any-return]


def test_probe_says_the_unit_watch_works_on_the_real_psi_file(psi: str) -> None:
    status = _probe(
        {"MEMORY_PRESSURE_WATCH": psi, "MEMORY_PRESSURE_WRITE": _b64(b"some 150000 2000000\0")}
    )
    assert status["works"] is True, status
    assert f'{psi}, trigger "some 150000 2000000\\0"' in str(status["detail"])
    assert "$MEMORY_PRESSURE_WATCH" in str(status["detail"])
    unset = _probe({})
    assert unset["works"] is False
    assert "MEMORY_PRESSURE_WATCH is not set" in str(unset["detail"])


def test_unprivileged_trigger_needs_a_2s_window_and_a_nul(psi: str) -> None:
    need_tool("setpriv")
    drop = ("setpriv", "--inh-caps=-sys_resource", "--bounding-set=-sys_resource")
    cases = {
        b"some 150000 2000000\0": True,
        b"some 150000 1000000\0": False,  # a 1 s window needs CAP_SYS_RESOURCE
        b"some 150000 2000000": False,  # the kernel overwrites the last byte: a 200 ms window
    }
    for trigger, works in cases.items():
        env = {"MEMORY_PRESSURE_WATCH": psi, "MEMORY_PRESSURE_WRITE": _b64(trigger)}
        status = _probe(env, *drop)
        assert status["works"] is works, (trigger, status)
        if not works:
            assert "multiple of 2 s" in str(status["detail"]) and "NUL" in str(status["detail"])


def _monitor(monkeypatch: pytest.MonkeyPatch, watch: str, write: bytes) -> PressureMonitor:
    monkeypatch.setenv("MEMORY_PRESSURE_WATCH", watch)
    monkeypatch.setenv("MEMORY_PRESSURE_WRITE", _b64(write))
    return PressureMonitor(lambda level, source: None, mode="auto")


def test_auto_mode_watches_only_the_units_file(psi: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = _monitor(monkeypatch, psi, b"some 100000 2000000\0")
    with monitor:
        assert monitor.active_sources() == ["systemd", "manual"]
        assert "psi-trigger" in monitor.skipped
        status = monitor.status()
        sources = status["sources"]
        assert isinstance(sources, dict) and sources["systemd"]["path"] == psi


def test_auto_mode_with_dev_null_watches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = _monitor(monkeypatch, "/dev/null", b"")
    with monitor:
        assert monitor.active_sources() == ["manual"]
        assert "disabled" in monitor.failed["systemd"]
        assert "meminfo" not in monitor.active_sources()  # no fallback against the unit's word


@pytest.fixture
def manager_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A listening Unix socket standing in for a memory-pressure broker."""
    path = str(tmp_path / "pressure.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(30)
        yield path, listener


def test_a_socket_watch_squeezes_a_running_server(
    tmp_path: Path, manager_socket: tuple[str, socket.socket]
) -> None:
    path, listener = manager_socket
    sock = str(tmp_path / "nbd.sock")
    control = str(tmp_path / "ctl.sock")
    env = {
        **child_env(),
        "MEMORY_PRESSURE_WATCH": path,
        "MEMORY_PRESSURE_WRITE": _b64(b"some 200000 2000000\0"),
    }
    proc = subprocess.Popen(
        blkback_cmd("serve", "-U", sock, "--control", control, "--pressure", "auto"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            assert conn.recv(64) == b"some 200000 2000000\0"  # written once, as sd-event does
            wait_for_socket(control, proc)

            def stats() -> dict[str, object]:
                res = subprocess.run(
                    blkback_cmd("ctl", "--control", control, "stats", "--json"),
                    capture_output=True, text=True, env=child_env(), timeout=60, check=True,
                )  # fmt: skip
                return json.loads(res.stdout)  # type: ignore[no-any-return]

            pressure = stats()["pressure"]
            assert isinstance(pressure, dict)
            assert pressure["monitor"]["active"] == ["systemd", "manual"]
            conn.sendall(b"pressure\n")
            level = PressureLevel.MEDIUM.name.lower()
            wait_until(
                lambda: stats()["pressure"]["events"].get(f"systemd:{level}", 0) >= 1,  # type: ignore[index]
                30,
                "the unit's pressure event to reach the devices",
            )
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.root
@pytest.mark.slow
def test_real_stall_on_the_psi_file_fires_the_units_trigger(
    psi: str, tmp_path: Path, pressure_cgroup: MemoryCgroup
) -> None:
    """A hog in a memory-limited cgroup with swap stalls on memory; the global PSI file sees
    it, and the unit's trigger (10 ms of "some" stall per 2 s) reaches the server."""
    sock = str(tmp_path / "nbd.sock")
    control = str(tmp_path / "ctl.sock")
    env = {
        **child_env(),
        "MEMORY_PRESSURE_WATCH": psi,
        "MEMORY_PRESSURE_WRITE": _b64(b"some 10000 2000000\0"),
    }
    proc = subprocess.Popen(
        blkback_cmd("serve", "-U", sock, "--control", control, "--pressure", "auto"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip

    def systemd_events() -> int:
        res = subprocess.run(
            blkback_cmd("ctl", "--control", control, "stats", "--json"),
            capture_output=True, text=True, env=child_env(), timeout=60, check=True,
        )  # fmt: skip
        monitor = json.loads(res.stdout)["pressure"]["monitor"]
        assert monitor["active"] == ["systemd", "manual"], monitor
        return int(monitor["sources"]["systemd"]["events"])

    try:
        wait_for_socket(control, proc)
        time.sleep(2.5)  # a trigger may fire once right after arming, without a stall
        before = systemd_events()
        with MemoryHog(160, cgroup=pressure_cgroup):
            wait_until(lambda: systemd_events() > before, 30, "a PSI event from the real stall")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
