"""Durability: on the file backend, what was acknowledged after FLUSH or with FUA survives
``kill -9`` of the server at a random moment (verified through the restarted server).

``kill -9`` kills the process, not the machine: data in the page cache survives. What this
proves is that the server never acknowledges a FUA write or a FLUSH before the data has left
its own process (no user-space write-back), and that it never corrupts or tears blocks.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from rsupport import CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_FUA, REPLY, connect, recv_exact, request

BLOCK = 4096
BLOCKS = 2048  # an 8 MiB export
ROUNDS = 101


def _content(round_no: int, block: int) -> bytes:
    head = struct.pack(">IIQ", round_no, block, 0x5EED)
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


class Writer:
    """Pipelines writes (some FUA) and FLUSHes until the server dies; tracks what is durable."""

    def __init__(self, sock: socket.socket, round_no: int, rng: random.Random) -> None:
        self.sock = sock
        self.round_no = round_no
        self.rng = rng
        self.lock = threading.Lock()
        self.sent: dict[int, tuple[str, list[int], bool]] = {}  # cookie -> kind, blocks, fua
        self.acked: set[int] = set()  # acknowledged write cookies
        self.flush_covers: dict[int, set[int]] = {}  # flush cookie -> writes acked before it
        self.durable_blocks: set[int] = set()
        self.written_blocks: set[int] = set()  # sent (may or may not have landed)
        self.acked_blocks: set[int] = set()

    def send_loop(self) -> None:
        order = list(range(BLOCKS))
        self.rng.shuffle(order)
        cookie = 0
        try:
            while order:
                cookie += 1
                if cookie % 9 == 0:
                    with self.lock:
                        self.flush_covers[cookie] = set(self.acked)
                        self.sent[cookie] = ("flush", [], False)
                    self.sock.sendall(request(CMD_FLUSH, 0, 0, cookie))
                    continue
                n = min(len(order), self.rng.choice((1, 1, 1, 2, 4)))
                # consecutive runs of blocks: one request may cover several
                first = order.pop()
                blocks = list(range(first, min(first + n, BLOCKS)))
                for b in blocks[1:]:
                    if b in order:
                        order.remove(b)
                    else:
                        blocks = blocks[: blocks.index(b)]
                        break
                fua = self.rng.random() < 0.3
                payload = b"".join(_content(self.round_no, b) for b in blocks)
                with self.lock:
                    self.sent[cookie] = ("write", blocks, fua)
                    self.written_blocks.update(blocks)
                hdr = request(CMD_WRITE, blocks[0] * BLOCK, len(payload), cookie,
                              FLAG_FUA if fua else 0)  # fmt: skip
                self.sock.sendall(hdr + payload)
        except OSError:
            return

    def recv_loop(self) -> None:
        try:
            while True:
                magic, err, cookie = REPLY.unpack(recv_exact(self.sock, 16))
                assert magic == 0x67446698 and err == 0, (hex(magic), err)
                with self.lock:
                    kind, blocks, fua = self.sent[cookie]
                    if kind == "write":
                        self.acked.add(cookie)
                        self.acked_blocks.update(blocks)
                        if fua:
                            self.durable_blocks.update(blocks)
                    else:
                        for c in self.flush_covers.pop(cookie):
                            self.durable_blocks.update(self.sent[c][1])
        except (OSError, ConnectionError):
            return


@pytest.mark.slow
def test_acknowledged_flush_and_fua_writes_survive_kill_9(serve, tmp_path: Path) -> None:
    image = tmp_path / "durable.img"
    rng = random.Random(2024)
    expected: list[bytes] = [bytes(BLOCK)] * BLOCKS
    totals = {"durable": 0, "acked_not_durable": 0, "lost_acked": 0, "landed_unacked": 0,
              "sent_unacked": 0}  # fmt: skip
    bytes_verified = 0
    rounds = 0
    for round_no in range(1, ROUNDS + 1):
        s = serve(f"d=file:{image}:{BLOCKS * BLOCK}")
        # Verify the previous round through the restarted server.
        sock, _ = connect(s.sock, b"d")
        sock.sendall(request(CMD_READ, 0, BLOCKS * BLOCK, 1))
        _, err, _ = REPLY.unpack(recv_exact(sock, 16))
        assert err == 0
        image_now = recv_exact(sock, BLOCKS * BLOCK)
        sock.close()
        if round_no > 1:
            w = last  # noqa: F821 (set at the end of the previous round)
            for b in range(BLOCKS):
                got = image_now[b * BLOCK : (b + 1) * BLOCK]
                new = _content(round_no - 1, b)
                if b in w.durable_blocks:
                    assert got == new, f"round {round_no - 1}: durable block {b} lost"
                elif b in w.written_blocks:
                    assert got in (new, expected[b]), f"block {b} torn or corrupt"
                    if b in w.acked_blocks and got != new:
                        totals["lost_acked"] += 1
                    if b not in w.acked_blocks and got == new:
                        totals["landed_unacked"] += 1
                else:
                    assert got == expected[b], f"block {b} changed though never written"
                expected[b] = got
            bytes_verified += BLOCKS * BLOCK
            totals["durable"] += len(w.durable_blocks)
            totals["acked_not_durable"] += len(w.acked_blocks - w.durable_blocks)
            totals["sent_unacked"] += len(w.written_blocks - w.acked_blocks)
            rounds += 1
        else:
            assert image_now == b"".join(expected)
        if round_no == ROUNDS:
            break
        sock, _ = connect(s.sock, b"d", timeout_s=30)
        last = Writer(sock, round_no, rng)
        threads = [threading.Thread(target=last.send_loop), threading.Thread(target=last.recv_loop)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait()
        for t in threads:
            t.join(30)
        sock.close()
    print(
        f"\n{rounds} kill -9 rounds verified, {bytes_verified} bytes read back; blocks "
        f"durable {totals['durable']}, acked but not flushed {totals['acked_not_durable']} "
        f"(lost: {totals['lost_acked']}), sent but unacknowledged {totals['sent_unacked']} "
        f"(landed anyway: {totals['landed_unacked']})"
    )
    assert rounds >= 100
    assert totals["durable"] > 1000
