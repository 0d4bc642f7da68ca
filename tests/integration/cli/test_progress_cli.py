"""Progress bars as a user sees them: drawn on a terminal's stderr, absent from a pipe."""

from __future__ import annotations

import os
import re
import subprocess

from support import blkback_cmd, child_env

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SWEEP = ("sim", "sweep", "--duration", "1,10", "--sim-seconds", "0.2", "--engine", "serial")


def test_no_progress_when_stderr_is_a_pipe() -> None:
    res = subprocess.run(
        blkback_cmd(*SWEEP), capture_output=True, text=True, env=child_env(), timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert "pswpin" in res.stdout  # the results still come out


def test_progress_bar_on_a_terminal() -> None:
    master, slave = os.openpty()
    env = {**child_env(), "TERM": "xterm", "COLUMNS": "120"}
    try:
        proc = subprocess.Popen(blkback_cmd(*SWEEP), stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        chunks = []
        while True:  # read as it comes, so the child never blocks on a full terminal buffer
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child has exited and the terminal is drained
                break
            if not chunk:
                break
            chunks.append(chunk)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        stdout = out.decode()
    finally:
        os.close(master)
    drawn = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    assert "sweep" in drawn
    assert "2/2 hosts" in drawn
    assert "pswpin" not in drawn  # results go to stdout, not into the bar's stream
    assert "pswpin" in stdout
