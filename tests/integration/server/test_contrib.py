"""The example systemd units and config in contrib/, run as systemd would run them.

``systemd-socket-activate`` plays the socket unit: it binds the unit's ``ListenStream=``
sockets and starts the service's ``ExecStart=`` with them (``LISTEN_FDS``), or, for the
``Accept=yes`` pair, one ``--single`` process per connection with the socket on stdin.
Paths under /run, /var/lib and /etc are moved into the test's directory.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from support import REPO, blkback_cmd, child_env, need_tool, run, wait_for_socket

from blkback.server.config import load_config
from blkback.storage.spec import parse_spec

CONTRIB = REPO / "contrib"


def _unit_values(unit: str, key: str) -> list[str]:
    lines = (CONTRIB / unit).read_text().splitlines()
    return [line.split("=", 1)[1].strip() for line in lines if line.startswith(f"{key}=")]


class Relocated:
    """contrib's paths moved under a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "run").mkdir()
        (root / "lib").mkdir()  # StateDirectory=
        self.config = root / "blkback.toml"
        self.config.write_text(self.move((CONTRIB / "blkback.toml").read_text()))

    def move(self, text: str) -> str:
        return (
            text.replace("/run/blkback", str(self.root / "run"))
            .replace("/var/lib/blkback", str(self.root / "lib"))
            .replace("/etc/blkback/blkback.toml", str(self.config))
        )

    def exec_start(self, unit: str) -> list[str]:
        (line,) = _unit_values(unit, "ExecStart")
        argv = shlex.split(self.move(line))
        assert argv[0] == "/usr/local/bin/blkback"
        return [*blkback_cmd(*argv[1:]), "--pressure", "off"]


@pytest.fixture
def relocated(tmp_path: Path) -> Relocated:
    return Relocated(tmp_path)


def test_example_config_is_valid_and_its_exports_parse() -> None:
    values = load_config(str(CONTRIB / "blkback.toml"))
    assert [e.split("=", 1)[0] for e in values["exports"]] == ["disk", "remote"]
    for export in values["exports"]:
        parse_spec(export.split("=", 1)[1])


def test_socket_and_service_units_under_systemd_socket_activate(
    relocated: Relocated, procs: list[subprocess.Popen[str]]
) -> None:
    need_tool("systemd-socket-activate", "nbdinfo", "qemu-io")
    listens = [relocated.move(v) for v in _unit_values("blkback.socket", "ListenStream")]
    unix = [v for v in listens if v.startswith("/")]
    assert unix and _unit_values("blkback.socket", "Accept") == ["no"]
    cmd = ["systemd-socket-activate"]
    for path in unix:  # (the TCP one is left out: port 10809 may be taken on a test host)
        cmd += ["-l", path]
    p = subprocess.Popen(
        [*cmd, *relocated.exec_start("blkback.service")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    procs.append(p)
    wait_for_socket(unix[0], p)  # type: ignore[arg-type]
    uri = f"nbd+unix:///disk?socket={unix[0]}"
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M"])
    info = json.loads(run(["nbdinfo", "--json", f"nbd+unix:///remote?socket={unix[0]}"]).stdout)
    assert info["exports"][0]["export-size"] == 10 << 30
    assert (relocated.root / "lib" / "disk.img").stat().st_size == 1 << 30
    # The config's control socket, moved: ctl reaches the activated server there.
    control = str(relocated.root / "run" / "control.sock")
    res = run(blkback_cmd("ctl", "--control", control, "stats", "--json"), env=child_env())
    assert json.loads(res.stdout)["server"]["listen"] == [f"unix:{unix[0]}"]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err


def test_accept_yes_pair_serves_each_connection_in_its_own_process(
    relocated: Relocated, procs: list[subprocess.Popen[str]]
) -> None:
    need_tool("systemd-socket-activate", "nbdinfo")
    assert _unit_values("blkback-single.socket", "Accept") == ["yes"]
    assert _unit_values("blkback-single@.service", "StandardInput") == ["socket"]
    (path,) = [relocated.move(v) for v in _unit_values("blkback-single.socket", "ListenStream")]
    p = subprocess.Popen(
        ["systemd-socket-activate", "--inetd", "-a", "-l", path,
         *relocated.exec_start("blkback-single@.service")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    procs.append(p)
    wait_for_socket(path, p)  # type: ignore[arg-type]
    for _ in range(2):  # the config's control socket must not make the second one fail
        info = json.loads(run(["nbdinfo", "--json", f"nbd+unix:///disk?socket={path}"]).stdout)
        assert info["exports"][0]["export-size"] == 1 << 30
