"""``blkback ctl`` against a running server: options after the action, text and JSON."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

from support import Served, blkback_cmd, child_env

# Holds one connection open (a ring) until its stdin closes.
LIBNBD_HOLD = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"x" * 65536, 0)
print("ready", flush=True)
sys.stdin.read()
h.shutdown()
"""


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        blkback_cmd("ctl", *args), capture_output=True, text=True, env=child_env(), timeout=60
    )


def test_stats_with_control_after_the_action(serve: Callable[..., Served]) -> None:
    s = serve("disk=memory:8M")
    holder = subprocess.Popen(
        ["/usr/bin/python3", "-c", LIBNBD_HOLD, s.uri()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        res = _ctl("stats", "--control", s.control)
        assert res.returncode == 0, res.stderr
        assert "device disk: not squeezed" in res.stdout
        assert ", 1 connection (" in res.stdout  # (the fixture's readiness probe was another)
        assert "oo: requests that found no free request slot" in res.stdout
        [row] = [x for x in res.stdout.splitlines() if x.split()[:1] == ["0"]]
        assert "(64 KiB)" in row  # the pool, in pages and bytes
        as_json = json.loads(_ctl("stats", "--json", "--control", s.control).stdout)
        assert as_json["devices"][0]["rings"][0]["requests"]["wr"] == 1
    finally:
        holder.communicate("", timeout=30)
    # Before the action, as it always worked.
    assert _ctl("--control", s.control, "get", "max_buffer_pages").stdout == "1024\n"


def test_pressure_status_is_text_and_json_on_request(serve: Callable[..., Served]) -> None:
    s = serve(pressure="manual")
    s.ctl("pressure", "--level", "low")
    text = _ctl("pressure", "--status", "--control", s.control).stdout
    assert text.startswith("pressure monitor: mode manual, running")
    assert "active sources:\n  manual: " in text
    assert "{" not in text
    status = json.loads(_ctl("pressure", "--status", "--json", "--control", s.control).stdout)
    assert status["mode"] == "manual"
    assert status["active"] == ["manual"]


def test_pressure_status_of_a_server_without_monitor(serve: Callable[..., Served]) -> None:
    s = serve(pressure="off")
    res = _ctl("pressure", "--status", "--control", s.control)
    assert res.stdout == "the server listens to no pressure source (started with --pressure off)\n"
