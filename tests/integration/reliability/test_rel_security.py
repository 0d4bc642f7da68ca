"""Security: loopback by default, the control socket, read-only exports, TLS."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from rsupport import (
    CMD_TRIM,
    CMD_WRITE,
    CMD_ZEROES,
    OPT_GO,
    OPT_STARTTLS,
    connect,
    go_data,
    greet,
    libnbd,
    make_certs,
    option,
    read_option_reply,
    request,
    simple_reply,
)
from support import blkback_cmd, child_env, need_root, need_tool, run, wait_for_socket

EPERM = 1
ERR_TLS_REQD = 2**31 + 5
ERR_POLICY = 2**31 + 2
MiB = 2**20


def test_non_loopback_listen_logs_a_warning_and_loopback_does_not(tmp_path: Path) -> None:
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        control = str(tmp_path / f"ctl-{host}.sock")
        proc = subprocess.Popen(
            blkback_cmd(
                "serve", "--listen", f"tcp:{host}:0", "--control", control,
                "--export", "d=memory:1M", "--pressure", "off",
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        )  # fmt: skip
        try:
            wait_for_socket(control, proc)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        assert ("non-loopback" in err) is warned, err


def test_default_listen_is_loopback() -> None:
    from blkback.server.server import parse_listen
    from blkback.server.settings import DEFAULT_TCP

    _, (host, _) = parse_listen(DEFAULT_TCP)
    assert host == "127.0.0.1"


def test_control_socket_is_0600_and_refuses_other_users(serve) -> None:
    need_root("running a client as nobody")
    need_tool("setpriv")
    s = serve("disk=memory:1M")
    st = os.stat(s.control)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        'try: s.sendall(b\'{"op": "stats"}\\n\')\n'
        "except OSError: pass\n"
        "print(s.recv(4096).decode())\n"
    )
    code_connect = "import socket,sys\nsocket.socket(socket.AF_UNIX).connect(sys.argv[1])\n"
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"]
    # Even with the file mode opened up, SO_PEERCRED keeps other users out. The socket is
    # moved (a rename keeps it bound) to a directory that user can reach.
    public = Path(tempfile.mkdtemp(prefix="blkback-ctl-"))
    public.chmod(0o755)
    moved = str(public / "ctl.sock")
    res = subprocess.run([*as_nobody, "-c", code_connect, s.control], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert "PermissionError" in res.stderr  # 0600 in a 0700 directory: not even a connect
    os.rename(s.control, moved)
    try:
        os.chmod(moved, 0o666)
        res = subprocess.run([*as_nobody, "-c", code, moved], capture_output=True, text=True,
                             timeout=30)  # fmt: skip
    finally:
        os.rename(moved, s.control)
        public.rmdir()
    assert res.returncode == 0, res.stderr
    assert "permission denied" in res.stdout
    assert '"devices"' not in res.stdout
    assert s.stats()["server"]["connections"] == 0  # the owner still gets answers


def test_readonly_export_refuses_writes_trims_and_zeroes_with_eperm(serve) -> None:
    s = serve("ro=memory:1M,readonly")
    sock, _ = connect(s.sock, b"ro")
    sock.sendall(request(CMD_WRITE, 0, 4096, cookie=1) + b"x" * 4096)
    sock.sendall(request(CMD_TRIM, 0, 4096, cookie=2))
    sock.sendall(request(CMD_ZEROES, 0, 4096, cookie=3))
    got = {simple_reply(sock)[:2] for _ in range(3)}
    assert got == {(EPERM, 1), (EPERM, 2), (EPERM, 3)}
    sock.close()
    # The same through libnbd, which reports the errno the server sent.
    res = libnbd(
        "import nbd,sys,errno\n"
        "h=nbd.NBD(); h.set_strict_mode(0); h.connect_uri(sys.argv[1])\n"
        "assert h.is_read_only()\n"
        "for f in (lambda: h.pwrite(b'a'*512, 0), lambda: h.trim(512, 0),"
        " lambda: h.zero(512, 0)):\n"
        "    try: f(); print('accepted')\n"
        "    except nbd.Error as e: print(errno.errorcode[e.errnum])\n"
        "print(h.pread(512, 0) == bytes(512))\n",
        s.uri("ro"),
    )
    assert res.stdout.split() == ["EPERM", "EPERM", "EPERM", "True"], res.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_tool("openssl")
    return make_certs(tmp_path_factory.mktemp("pki") / "certs")


def _tls_uri(s, certs: Path, name: str = "disk") -> str:  # type: ignore[no-untyped-def]
    return f"nbds+unix:///{name}?socket={s.sock}&tls-certificates={certs}"


def test_tls_required_serves_nbdinfo_nbdcopy_and_qemu_img(
    serve, certs: Path, tmp_path: Path
) -> None:
    need_tool("nbdinfo", "nbdcopy", "qemu-img")
    s = serve(
        "disk=memory:8M",
        f"file=file:{tmp_path}/f.img:8M",  # worker threads reply while the ring reads: TLS
        extra=("--tls", "require", "--tls-certificates", str(certs)),
    )
    out = run(["nbdinfo", _tls_uri(s, certs)]).stdout
    assert "with TLS" in out
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    run(["nbdcopy", str(src), _tls_uri(s, certs)])
    back = tmp_path / "back.img"
    run(["nbdcopy", _tls_uri(s, certs), str(back)])
    assert back.read_bytes() == src.read_bytes()
    run(["nbdcopy", "--requests=64", str(src), _tls_uri(s, certs, "file")])
    run(["nbdcopy", _tls_uri(s, certs, "file"), str(back)])
    assert back.read_bytes() == src.read_bytes()
    run([
        "qemu-img", "compare",
        "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
        "--image-opts", f"driver=file,filename={src}",
        f"driver=nbd,path={s.sock},export=disk,tls-creds=tls0,tls-hostname=localhost",
    ])  # fmt: skip
    # Without TLS: every option but STARTTLS is refused, the export is unreachable.
    sock = greet(s.sock)
    sock.sendall(option(OPT_GO, go_data(b"disk")))
    assert read_option_reply(sock)[1] == ERR_TLS_REQD
    sock.close()
    res = subprocess.run(["nbdinfo", s.uri("disk")], capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert s.stats()["server"]["connections"] == 0


def test_tls_allow_serves_both_and_off_refuses_starttls(serve, certs: Path) -> None:
    need_tool("nbdinfo")
    s = serve("disk=memory:1M", extra=("--tls", "allow", "--tls-certificates", str(certs)))
    assert "with TLS" in run(["nbdinfo", _tls_uri(s, certs)]).stdout
    assert "without TLS" in run(["nbdinfo", s.uri("disk")]).stdout
    plain = serve("disk=memory:1M")
    sock = greet(plain.sock)
    sock.sendall(option(OPT_STARTTLS))
    assert read_option_reply(sock)[1] == ERR_POLICY
    sock.close()


def test_tls_verify_peer_refuses_clients_without_a_certificate(
    serve, certs: Path, tmp_path: Path
) -> None:
    need_tool("nbdinfo")
    s = serve(
        "disk=memory:1M",
        extra=("--tls", "require", "--tls-certificates", str(certs), "--tls-verify-peer"),
    )
    assert "with TLS" in run(["nbdinfo", _tls_uri(s, certs)]).stdout  # has client-cert.pem
    anon = tmp_path / "anon"
    anon.mkdir()
    (anon / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
    res = subprocess.run(["nbdinfo", _tls_uri(s, anon)], capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    # A client that stalls inside the TLS handshake is dropped too, and the server goes on.
    sock = greet(s.sock)
    sock.sendall(option(OPT_STARTTLS))
    assert read_option_reply(sock)[1] == 1  # ACK; then we never send a ClientHello
    time.sleep(0.2)
    assert "with TLS" in run(["nbdinfo", _tls_uri(s, certs)]).stdout
    sock.close()


def test_tls_options_are_checked_at_start(tmp_path: Path) -> None:
    res = subprocess.run(
        blkback_cmd("serve", "--listen", f"unix:{tmp_path}/s", "--control", f"{tmp_path}/c",
                    "--tls", "require", "--pressure", "off"),
        capture_output=True, text=True, env=child_env(), timeout=30,
    )  # fmt: skip
    assert res.returncode != 0
    assert "TLS needs a certificate and key" in res.stderr
