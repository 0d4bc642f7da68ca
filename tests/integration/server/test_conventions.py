"""nbdkit's and systemd's conventions, driven by the real peers that use them.

``--run`` (captive mode) with nbdinfo and qemu-img, ``--single`` with libnbd's
``nbd_connect_command``, an inetd-style hand-over of one socket as stdin only (what
``nbd-tester-client -I`` and inetd ``nowait`` do) and ``systemd-socket-activate --inetd``,
socket activation with ``systemd-socket-activate`` and nbdinfo's ``[ CMD ]``,
``--exit-with-parent``, ``--print-uri``/``-P``/``-U``/``-e``/``-r``, default control sockets
that do not clash, and the exit status of runtime failures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from support import (
    assert_no_thread_wakes,
    blkback_cmd,
    child_env,
    export_name,
    need_tool,
    raw_write,
    recv_exact,
    rings_at_rest,
    run,
    sampling_parked,
    start_handshake,
    wait_for_socket,
    wait_until,
)

REQ = struct.Struct(">IHHQQI")
REQ_MAGIC, REPLY_MAGIC = 0x25609513, 0x67446698
CMD_READ, CMD_DISC = 0, 2
USR_PY = "/usr/bin/python3"  # Debian's python3 has libnbd's ``nbd`` module


def _spawn(
    procs: list[subprocess.Popen[str]], cmd: list[str], **kw: object
) -> subprocess.Popen[str]:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    p = subprocess.Popen(cmd, text=True, env=kw.pop("env", child_env()), **kw)  # type: ignore[call-overload]
    procs.append(p)
    return p


# -- --run ---------------------------------------------------------------------------------
def test_run_serves_nbdinfo_on_a_private_socket_and_exits_with_its_status(tmp_path: Path) -> None:
    need_tool("nbdinfo")
    out = tmp_path / "info.json"
    script = (
        f'nbdinfo --json "$uri" > {out} && '
        f'echo "$unixsocket|$port|$tls|$exportname" > {tmp_path}/env && test -S "$unixsocket"'
        " && exit 7"
    )
    res = subprocess.run(
        blkback_cmd("serve", "--pressure", "off", "--export", "vol=memory:16M", "--run", script),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert res.returncode == 7, res.stderr
    assert res.stdout == ""  # captive mode prints nothing of its own
    info = json.loads(out.read_text())
    assert info["exports"][0]["export-size"] == 16 << 20
    unixsocket, port, tls, exportname = (tmp_path / "env").read_text().strip().split("|")
    assert (port, tls, exportname) == ("", "0", "vol")
    assert not Path(unixsocket).exists()  # the private directory is gone
    assert not Path(unixsocket).parent.exists()


def test_run_with_a_tcp_port_gives_qemu_img_the_uri_and_a_signal_status(tmp_path: Path) -> None:
    need_tool("qemu-img")
    res = subprocess.run(
        blkback_cmd(
            "serve", "--pressure", "off", "-p", "0", "--control", str(tmp_path / "c"),
            "--run", 'qemu-img info --output=json "$uri" > info && echo "$port" > port',
        ),
        capture_output=True, text=True, env=child_env(), timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "info").read_text())["virtual-size"] == 1 << 30
    assert int((tmp_path / "port").read_text()) > 0
    killed = subprocess.run(
        blkback_cmd("serve", "--pressure", "off", "--run", "kill -TERM $$"),
        capture_output=True, text=True, env=child_env(), timeout=120,
    )  # fmt: skip
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr


def test_run_sleeps_while_its_command_runs_and_passes_it_a_stop_signal(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    started = tmp_path / "started"
    p = _spawn(
        procs,
        blkback_cmd(
            "serve", "--pressure", "off", "--run", f"touch {started} && exec sleep 60"
        ),
    )  # fmt: skip
    wait_until(started.exists, 60, "the captive command to start")
    assert_no_thread_wakes(p.pid, 2.5)  # it used to look at its command twice a second
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM, err  # the command's death, as sh reports it


# -- --single ------------------------------------------------------------------------------
def test_single_serves_libnbd_connect_command() -> None:
    need_tool(USR_PY)
    script = (
        "import nbd, sys\n"
        "h = nbd.NBD()\n"
        "h.connect_command(sys.argv[1:])\n"
        "h.pwrite(b'\\xa5' * 4096, 8192)\n"
        "assert h.pread(4096, 8192) == b'\\xa5' * 4096\n"
        "print(h.get_size())\n"
        "h.shutdown()\n"
    )
    cmd = blkback_cmd("serve", "--single", "--pressure", "off", "--export", "d=memory:8M")
    res = run([USR_PY, "-c", script, *cmd], env=child_env())
    assert res.stdout.strip() == str(8 << 20)


def _oldstyle_export_name_session(sock: socket.socket) -> bytes:
    """What nbd-tester-client does: NBD_OPT_EXPORT_NAME, a write, a read back, DISC."""
    start_handshake(sock)
    size, _tflags = export_name(sock, b"")
    assert size == 4 << 20
    data = os.urandom(65536)
    raw_write(sock, 4096, data)
    sock.sendall(REQ.pack(REQ_MAGIC, 0, CMD_READ, 2, 4096, len(data)))
    assert struct.unpack(">IIQ", recv_exact(sock, 16)) == (REPLY_MAGIC, 0, 2)
    back = recv_exact(sock, len(data))
    sock.sendall(REQ.pack(REQ_MAGIC, 0, CMD_DISC, 3, 0, 0))
    assert sock.recv(1) == b""  # the server closes after DISC
    assert back == data
    return back


def test_single_with_one_socket_handed_over_as_stdin_only(
    procs: list[subprocess.Popen[str]],
) -> None:
    # nbd-tester-client -I: a socketpair, the server's end as stdin, stdout a pipe.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        p = _spawn(
            procs,
            blkback_cmd("serve", "-s", "--pressure", "off", "--export", "d=memory:4M"),
            stdin=theirs,
        )
        theirs.close()
        ours.settimeout(30)
        _oldstyle_export_name_session(ours)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out == ""  # nothing printed where a client might read


def test_single_under_inetd_style_activation(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    # systemd-socket-activate --inetd: each connection gets its own server, the socket on
    # stdin AND stdout (inetd nowait, systemd Accept=yes with StandardInput=socket).
    need_tool("systemd-socket-activate")
    path = str(tmp_path / "inetd.sock")
    cmd = blkback_cmd("serve", "--single", "--pressure", "off", "--export", "d=memory:4M")
    activator = _spawn(procs, ["systemd-socket-activate", "--inetd", "-a", "-l", path, *cmd])
    wait_for_socket(path, activator)  # type: ignore[arg-type]
    for _ in range(2):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(path)
            _oldstyle_export_name_session(sock)


@pytest.mark.parametrize("pressure", ["off", "psi-trigger,psi-total"])
def test_single_sleeps_while_its_client_idles_and_exits_when_it_leaves(
    tmp_path: Path, procs: list[subprocess.Popen[str]], pressure: str
) -> None:
    # One process per connection (inetd, Accept=yes): an idle one must cost nothing. The
    # main thread used to look for the client's departure every second, and each process's
    # pressure monitor sampled the PSI totals 4 times a second while quiet; now the quiet
    # sampling stops while the PSI trigger (which the kernel wakes us for) is armed.
    control = str(tmp_path / "control.sock")
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            p = _spawn(
                procs,
                blkback_cmd(
                    "serve", "-s", "--pressure", pressure, "--export", "d=memory:4M",
                    "--control", control,
                ),
                stdin=theirs,
            )  # fmt: skip
        ours.settimeout(30)
        start_handshake(ours)
        export_name(ours, b"")
        raw_write(ours, 0, b"x" * 4096)
        wait_until(
            lambda: rings_at_rest(control) and sampling_parked(control),
            30,
            "the ring to rest and the monitor to park",
        )
        assert_no_thread_wakes(p.pid, 2.5)
    # The client went away without NBD_CMD_DISC: the server exits at once, not a second
    # later (the whole start-and-stop of blkback serve takes far longer than that).
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out == ""


def test_single_refuses_a_stdin_that_is_not_a_socket() -> None:
    res = subprocess.run(
        blkback_cmd("serve", "--single", "--pressure", "off"),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=child_env(), timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert "stdin is not a socket" in res.stderr


# -- socket activation ---------------------------------------------------------------------
def test_socket_activation_with_systemd_socket_activate(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    need_tool("systemd-socket-activate", "nbdinfo")
    path = str(tmp_path / "act.sock")
    control = str(tmp_path / "ctl.sock")
    cmd = blkback_cmd(
        "serve", "--pressure", "off", "--control", control, "--export", "d=memory:2M",
        "--listen", "unix:/nonexistent/ignored.sock",  # inherited sockets win over --listen
    )  # fmt: skip
    p = _spawn(procs, ["systemd-socket-activate", "-l", path, *cmd])
    wait_for_socket(path, p)  # type: ignore[arg-type]
    info = json.loads(run(["nbdinfo", "--json", f"nbd+unix:///d?socket={path}"]).stdout)
    assert info["exports"][0]["export-size"] == 2 << 20
    wait_for_socket(control, p)  # type: ignore[arg-type]
    stats = json.loads(
        run(blkback_cmd("ctl", "--control", control, "stats", "--json"), env=child_env()).stdout
    )
    assert stats["server"]["listen"] == [f"unix:{path}"]
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    # The inherited socket belongs to the activator: the server does not unlink it.
    assert p.returncode == 0


def test_nbdinfo_starts_blkback_with_socket_activation() -> None:
    need_tool("nbdinfo")
    cmd = blkback_cmd("serve", "--pressure", "off", "--export", "d=memory:3M")
    res = run(["nbdinfo", "--json", "--", "[", *cmd, "]"], env=child_env())
    # The server prints nothing on the stdout it shares with nbdinfo: the JSON is clean.
    assert json.loads(res.stdout)["exports"][0]["export-size"] == 3 << 20


# -- --exit-with-parent, --print-uri, -P, -U, -e, -r -------------------------------------------
def test_exit_with_parent(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    sock = tmp_path / "p.sock"
    pidfile = tmp_path / "pid"
    serve = " ".join(
        blkback_cmd(
            "serve", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile),
            "--pressure", "off", "--control", str(tmp_path / "c"),
        )
    )  # fmt: skip
    parent = _spawn(procs, ["/bin/sh", "-c", f"{serve} & wait"])
    wait_until(pidfile.exists, 60, "the pidfile")
    server_pid = int(pidfile.read_text())
    assert (Path(f"/proc/{server_pid}/stat").read_text().split()[3]) == str(parent.pid)
    parent.kill()
    parent.communicate(timeout=30)
    wait_until(lambda: not Path(f"/proc/{server_pid}").exists() or _zombie(server_pid), 30,
               "the server to exit with its parent")  # fmt: skip
    wait_until(lambda: not pidfile.exists(), 30, "the pidfile to be removed")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_print_uri_pidfile_unix_exportname_readonly(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    need_tool("nbdinfo")
    sock = str(tmp_path / "u.sock")
    pidfile = tmp_path / "blkback.pid"
    p = _spawn(
        procs,
        blkback_cmd(
            "serve", "-f", "-U", sock, "-e", "b", "-r", "--print-uri", "-P", str(pidfile),
            "--export", "a=memory:1M", "--export", "b=memory:2M",
            "--pressure", "off", "--control", str(tmp_path / "c"),
        ),
    )  # fmt: skip
    assert p.stdout is not None
    assert p.stdout.readline().strip() == f"nbd+unix:///b?socket={sock}"
    assert int(pidfile.read_text()) == p.pid
    default = json.loads(run(["nbdinfo", "--json", f"nbd+unix://?socket={sock}"]).stdout)
    assert default["exports"][0]["export-size"] == 2 << 20  # -e b: b is the default export
    assert default["exports"][0]["is_read_only"] is True  # -r
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out == ""  # --print-uri: nothing but the one URI
    assert not pidfile.exists()


def test_exportname_must_name_an_export(tmp_path: Path) -> None:
    res = subprocess.run(
        blkback_cmd("serve", "-U", str(tmp_path / "s"), "-e", "nope", "--export", "a=memory:1M"),
        capture_output=True, text=True, env=child_env(), timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert "-e 'nope': no such export (exports: a)" in res.stderr


# -- control sockets and exit status -------------------------------------------------------
def _start_default_control(
    procs: list[subprocess.Popen[str]], sock: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[str], str]:
    p = _spawn(procs, blkback_cmd("serve", "-U", str(sock), "--pressure", "off"), env=env)
    assert p.stdout is not None
    lines = [p.stdout.readline().strip(), p.stdout.readline().strip()]
    assert lines[0] == f"nbd+unix:///disk?socket={sock}"
    assert lines[1].startswith("control: ")
    control = lines[1].removeprefix("control: ")
    wait_for_socket(control, p)  # type: ignore[arg-type]
    return p, control


def test_default_control_sockets_do_not_clash_and_ctl_finds_or_asks(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    env = child_env()
    env.pop("BLKBACK_CONTROL", None)
    env["BLKBACK_CONTROL_DIR"] = str(tmp_path / "run")

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            blkback_cmd("ctl", *args), capture_output=True, text=True, env=env, timeout=60
        )

    none = ctl("params")
    assert none.returncode == 1, none.stderr  # a runtime failure, not a usage error
    assert "no server listens" in none.stderr and "--control" in none.stderr
    a, control_a = _start_default_control(procs, tmp_path / "a.sock", env)
    b, control_b = _start_default_control(procs, tmp_path / "b.sock", env)
    assert control_a != control_b
    assert Path(control_a).parent == Path(control_b).parent == tmp_path / "run"
    several = ctl("params")
    assert several.returncode == 2
    assert "--control" in several.stderr and control_a in several.stderr
    assert ctl("--control", control_b, "params").returncode == 0
    # A third server told to use a busy control socket: exit 1, and the way out is named.
    busy = subprocess.run(
        blkback_cmd("serve", "-U", str(tmp_path / "c.sock"), "--control", control_a,
                    "--pressure", "off"),
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert busy.returncode == 1
    assert "in use by a running server" in busy.stderr and "--control" in busy.stderr
    b.send_signal(signal.SIGTERM)
    b.communicate(timeout=30)
    one = ctl("params")
    assert one.returncode == 0, one.stderr
    assert "max_buffer_pages" in one.stdout
    a.send_signal(signal.SIGTERM)
    a.communicate(timeout=30)
    assert not Path(control_a).exists()


def test_default_control_socket_is_derived_from_the_listen_address() -> None:
    from blkback.server.server import default_control_path

    env = dict(os.environ)
    try:
        os.environ.pop("BLKBACK_CONTROL", None)
        os.environ["BLKBACK_CONTROL_DIR"] = "/x"
        assert default_control_path("tcp:127.0.0.1:10809") == "/x/control-tcp-127.0.0.1-10809.sock"
        assert default_control_path("tcp:[::1]:10810") == "/x/control-tcp---1-10810.sock"
        unix_a = default_control_path("unix:/run/a.sock")
        assert unix_a != default_control_path("unix:/run/b.sock")
        assert len(unix_a) < 108
    finally:
        os.environ.clear()
        os.environ.update(env)


def test_address_in_use_is_a_runtime_failure(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run(
            blkback_cmd("serve", "-p", str(port), "--control", str(tmp_path / "c")),
            capture_output=True, text=True, env=child_env(), timeout=60,
        )  # fmt: skip
    assert res.returncode == 1
    assert "address in use" in res.stderr
