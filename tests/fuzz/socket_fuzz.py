"""Mutated client streams sent to a running server over its socket.

Usage: ``python -m tests.fuzz.socket_fuzz SOCKET [--inputs N] [--seed S] [--threads T]``

Each input (a mutated seed, as in :mod:`tests.fuzz.codec_fuzz`) goes to the server on a
fresh connection: the bytes are sent (giving up after a short timeout, as a client whose
peer stopped reading would), the write side is shut, replies are drained briefly, and the
socket is closed or reset. The caller then checks that the server is healthy.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from .codec_fuzz import load_seeds, mutate


@dataclass
class Tally:
    inputs: int = 0
    replies_bytes: int = 0
    send_stalled: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)


def send_one(
    path: str, data: bytes, rng: random.Random, tally: Tally, lock: threading.Lock
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(0.2)
    got = 0
    stalled = refused = 0
    try:
        sock.connect(path)
        greeting = sock.recv(18)
        if len(greeting) < 18:
            refused = 1
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except TimeoutError:
            stalled = 1
        except OSError:
            pass
        deadline = time.monotonic() + 0.2
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
    except OSError:
        pass
    finally:
        if rng.random() < 0.5:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    with lock:
        tally.inputs += 1
        tally.replies_bytes += got
        tally.send_stalled += stalled
        tally.refused += refused


def run(path: str, n: int, seed: int, threads: int = 2) -> Tally:
    seeds = load_seeds()
    tally = Tally()
    lock = threading.Lock()

    def worker(k: int, count: int) -> None:
        rng = random.Random(seed * 1000 + k)
        for _ in range(count):
            s = rng.choice(seeds)
            mode = rng.randrange(3)
            if mode == 0 or not s.requests:
                data = mutate(rng, s.whole, seeds)
            elif mode == 1:
                data = mutate(rng, s.handshake, seeds) + s.requests
            else:
                data = s.handshake + mutate(rng, s.requests, seeds)
            try:
                send_one(path, data, rng, tally, lock)
            except Exception as exc:
                with lock:
                    tally.errors.append(repr(exc))

    per = [n // threads + (i < n % threads) for i in range(threads)]
    ts = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(per)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("socket")
    p.add_argument("--inputs", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tally = run(args.socket, args.inputs, args.seed, args.threads)
    print(f"{tally} in {time.perf_counter() - t0:.1f} s")
    return 1 if tally.errors else 0


if __name__ == "__main__":
    sys.exit(main())
