"""Mutation fuzzer over the protocol codec: handshake, options and transmission phases.

Usage (the million-input run; the suite runs a smaller number)::

    .venv/bin/python -m tests.fuzz.codec_fuzz --inputs 1000000 --jobs 2 [--seed N]

Inputs are real client byte streams (``tests/fuzz/seeds``: nbdinfo, qemu-img/qemu-io and
nbdcopy captured against the server with ``tests/fuzz/capture.py``) plus a few synthetic
ones, mutated (bit flips, interesting integers, inserted/deleted/duplicated ranges, splices,
truncation). Each input is fed, cut at random points, to a fresh ``ServerHandshake`` in a
random TLS mode (``START_TLS`` is answered with ``tls_started()``, as if TLS came up); when
the handshake ends in ``DONE`` the rest goes through ``Transmission`` as a request stream,
every request checked and its reply encoded as the server would.

A third of the inputs mutate only the handshake part of a seed, a third only its
transmission part (so the request codec is reached with a valid negotiation), a third the
whole stream. Rule 2 of the codec is the oracle: nothing escapes but the documented errors
(``ProtocolError`` ends a stream, ``RequestError`` is a reply), and the handshake's state
invariants hold after every feed. A crashing input is written to ``--crash-dir``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from blkback.errors import ProtocolError, RequestError
from blkback.protocol.constants import Cmd, TFlag
from blkback.protocol.handshake import ExportInfo, HandshakeState, ServerHandshake, StaticCatalog
from blkback.protocol.transmission import REQUEST_SIZE, Transmission, unpack_request

SEEDS = Path(__file__).parent / "seeds"
MIB = 1 << 20
CATALOG = StaticCatalog(
    [
        ExportInfo("disk", MIB, 0x0FFF & ~int(TFlag.READ_ONLY), description="memory:1M"),
        ExportInfo("other", MIB, TFlag.READ_ONLY | TFlag.SEND_FLUSH, description="ro"),
        ExportInfo("aligned", 16 * MIB, 0x0FFF & ~int(TFlag.READ_ONLY), min_block=512),
    ]
)
INTERESTING = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x1001,
               0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 4097, 65536, 65537,
               1 << 25, (1 << 25) + 1]  # fmt: skip
TLS_MODES = ("off", "allow", "require")


@dataclass
class Seed:
    whole: bytes
    handshake: bytes  # the part a clean handshake consumed
    requests: bytes  # the rest: the transmission phase


def _split(data: bytes) -> Seed:
    hs = ServerHandshake(CATALOG)
    hs.feed(data)
    if hs.state is HandshakeState.DONE:
        cut = len(data) - len(hs.leftover)
        return Seed(data, data[:cut], hs.leftover)
    return Seed(data, data, b"")


def _synthetic() -> list[bytes]:
    """Streams that reach corners the captures do not: STARTTLS, EXPORT_NAME, meta contexts."""

    def opt(o: int, d: bytes = b"") -> bytes:
        return struct.pack(">QII", 0x49484156454F5054, o, len(d)) + d

    def go(name: bytes, infos: tuple[int, ...] = (0, 1, 2, 3)) -> bytes:
        body = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
        return body + b"".join(struct.pack(">H", i) for i in infos)

    def meta(name: bytes, queries: list[bytes]) -> bytes:
        body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        return body + b"".join(struct.pack(">I", len(q)) + q for q in queries)

    def req(cmd: int, off: int, ln: int, flags: int = 0, cookie: int = 7) -> bytes:
        return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, off, ln)

    reqs = (
        req(Cmd.WRITE, 0, 8, 1)
        + b"ABCDEFGH"
        + req(Cmd.READ, 0, 4096)
        + req(Cmd.FLUSH, 0, 0)
        + req(Cmd.TRIM, 4096, 4096)
        + req(Cmd.WRITE_ZEROES, 0, 512, 2 | 16)
        + req(Cmd.BLOCK_STATUS, 0, MIB, 8)
        + req(Cmd.CACHE, 0, 4096)
        + req(Cmd.DISC, 0, 0)
    )
    flags = struct.pack(">I", 3)
    return [
        flags + opt(5) + opt(8) + opt(10, meta(b"disk", [b"base:allocation"])) + opt(7, go(b"disk"))
        + reqs,
        flags + opt(1, b"disk") + reqs,
        flags + opt(3) + opt(9, meta(b"", [b"base:"])) + opt(6, go(b"other")) + opt(2),
        struct.pack(">I", 1) + opt(7, go(b"")) + reqs,
        flags + opt(11) + opt(8) + opt(7, go(b"aligned")) + reqs,
    ]  # fmt: skip


def load_seeds() -> list[Seed]:
    raw = [p.read_bytes() for p in sorted(SEEDS.glob("*.bin"))]
    return [_split(d) for d in raw + _synthetic()]


def mutate(rng: random.Random, data: bytes, pool: list[Seed]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        k = rng.randrange(9)
        n = len(buf)
        if k == 0 and n:  # bit flip
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif k == 1 and n:  # random byte
            buf[rng.randrange(n)] = rng.randrange(256)
        elif k in (2, 3) and n >= 4:  # an interesting integer at a random (often aligned) place
            width = rng.choice((2, 4, 8))
            if n >= width:
                i = rng.randrange(n - width + 1)
                if k == 3:
                    i -= i % 4
                v = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
                buf[i : i + width] = v.to_bytes(width, "big")
        elif k == 4:  # insert random bytes
            i = rng.randrange(n + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 32))
        elif k == 5 and n:  # delete a range
            i = rng.randrange(n)
            del buf[i : i + rng.randint(1, 64)]
        elif k == 6 and n:  # duplicate a range (repeated options or requests)
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 256))
            buf[j:j] = buf[i:j] * rng.randint(1, 4)
        elif k == 7:  # splice with another seed
            other = rng.choice(pool).whole
            if other:
                i = rng.randrange(n + 1)
                j = rng.randrange(len(other))
                buf[i:] = other[j : j + rng.randint(1, 1024)]
        elif k == 8 and n:  # truncate
            del buf[rng.randrange(n) :]
    return bytes(buf)


class Finding(Exception):  # noqa: N818
    """An invariant broke (not an exception from the codec itself)."""


def _check_state(hs: ServerHandshake) -> None:
    if hs.state is HandshakeState.DONE:
        if hs.negotiated is None or hs.error is not None:
            raise Finding("DONE without negotiated, or with an error")
        if not hs.negotiated.tflags & TFlag.HAS_FLAGS:
            raise Finding("HAS_FLAGS not set")
    elif hs.negotiated is not None:
        raise Finding(f"negotiated set in {hs.state}")
    if hs.state is HandshakeState.CLOSED and not hs.close_reason:
        raise Finding("CLOSED without a reason")
    if hs.error is not None and not isinstance(hs.error, ProtocolError):
        raise Finding(f"error of type {type(hs.error)}")


def run_transmission(tx: Transmission, data: bytes) -> int:
    """Parse and check every request in ``data`` as the server would; return requests seen."""
    pos = 0
    seen = 0
    contexts = sorted(tx.negotiated.meta_contexts)
    while len(data) - pos >= REQUEST_SIZE:
        try:
            flags, cmd, cookie, offset, length = unpack_request(data, pos)
        except ProtocolError:
            return seen
        pos += REQUEST_SIZE
        seen += 1
        try:
            tx.check(flags, cmd, offset, length)
        except RequestError as exc:
            reply = tx.error_reply(cookie, exc.errno, str(exc))
            if len(reply) < 16:
                raise Finding("short error reply") from exc
            if cmd == Cmd.WRITE:
                pos += length
            continue
        except ProtocolError:
            return seen
        if cmd == Cmd.DISC:
            return seen
        if cmd == Cmd.WRITE:
            pos += length
            tx.simple_reply(cookie)
        elif cmd == Cmd.READ:
            tx.read_reply_header(cookie, offset, length)
        elif cmd == Cmd.BLOCK_STATUS:
            for i, ctx in enumerate(contexts):
                tx.chunk_block_status(cookie, ctx, [(length, 0)], i == len(contexts) - 1)
        else:
            tx.simple_reply(cookie)
    return seen


def one_input(rng: random.Random, seeds: list[Seed]) -> tuple[bytes, int]:
    """Build and run one input; return it and how many requests it reached."""
    seed = rng.choice(seeds)
    mode = rng.randrange(3)
    if mode == 0 or not seed.requests:
        data = mutate(rng, seed.whole, seeds)
    elif mode == 1:
        data = mutate(rng, seed.handshake, seeds) + seed.requests
    else:
        data = seed.handshake + mutate(rng, seed.requests, seeds)
    tls = rng.choice(TLS_MODES)
    hs = ServerHandshake(
        CATALOG, tls=tls, max_option_len=rng.choice((4096, 65536)), max_options=100
    )
    hs.initial_bytes()
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 3)))
    prev = 0
    for cut in [*cuts, len(data)]:
        out = hs.feed(data[prev:cut])
        prev = cut
        if not isinstance(out, bytes):
            raise Finding("feed did not return bytes")
        _check_state(hs)
        if hs.state is HandshakeState.START_TLS:
            hs.tls_started()
        if hs.state in (HandshakeState.CLOSED, HandshakeState.DONE):
            break
    if hs.state is HandshakeState.IN_PROGRESS:
        hs.feed(b"")  # EOF
        _check_state(hs)
        if hs.state is not HandshakeState.CLOSED:
            raise Finding("EOF did not close the handshake")
    if hs.state is HandshakeState.DONE:
        assert hs.negotiated is not None
        rest = hs.leftover + data[prev:]
        return data, run_transmission(Transmission(hs.negotiated), rest)
    return data, 0


@dataclass
class Result:
    inputs: int = 0
    done_handshakes: int = 0
    requests: int = 0
    crashes: int = 0
    seconds: float = 0.0


def fuzz(n: int, seed: int, crash_dir: Path | None = None) -> Result:
    """Run ``n`` inputs from ``random.Random(seed)``; crashes are counted (and saved)."""
    rng = random.Random(seed)
    seeds = load_seeds()
    res = Result()
    t0 = time.perf_counter()
    for i in range(n):
        data = b""
        try:
            data, reqs = one_input(rng, seeds)
        except Exception:
            res.crashes += 1
            if crash_dir is not None:
                crash_dir.mkdir(parents=True, exist_ok=True)
                (crash_dir / f"crash-{seed}-{i}.bin").write_bytes(data)
                (crash_dir / f"crash-{seed}-{i}.txt").write_text(traceback.format_exc())
            if res.crashes <= 3:
                traceback.print_exc()
            continue
        res.inputs += 1
        if reqs:
            res.done_handshakes += 1
            res.requests += reqs
    res.inputs = n
    res.seconds = time.perf_counter() - t0
    return res


def _job(args: tuple[int, int, str | None]) -> Result:
    n, seed, crash_dir = args
    return fuzz(n, seed, Path(crash_dir) if crash_dir else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--inputs", type=int, default=1_000_000)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crash-dir", default="fuzz-crashes")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    per = [args.inputs // args.jobs + (i < args.inputs % args.jobs) for i in range(args.jobs)]
    work = [(n, args.seed + i, args.crash_dir) for i, n in enumerate(per)]
    if args.jobs == 1:
        results = [_job(work[0])]
    else:
        with multiprocessing.Pool(args.jobs) as pool:
            results = pool.map(_job, work)
    total = Result(
        inputs=sum(r.inputs for r in results),
        done_handshakes=sum(r.done_handshakes for r in results),
        requests=sum(r.requests for r in results),
        crashes=sum(r.crashes for r in results),
        seconds=time.perf_counter() - t0,
    )
    print(
        f"inputs {total.inputs}  reached transmission {total.done_handshakes}  "
        f"requests checked {total.requests}  crashes {total.crashes}  "
        f"time {total.seconds:.1f} s  ({total.inputs / total.seconds:.0f} inputs/s)"
    )
    return 1 if total.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
