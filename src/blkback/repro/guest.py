"""The guests of the memory-pressure test: many NBD devices written in bursts with idle gaps.

Run with Debian's ``/usr/bin/python3`` (it has libnbd's ``nbd`` module); imports nothing of
blkback. One process plays every blkfront guest: it opens ``--connections`` NBD connections
to each export (each one a ring with its own page pool in the server) and, every
``--period`` seconds, each connection writes one burst of ``--burst`` bytes as
``--request``-sized aio writes all in flight at once (queue depth burst/request), then stays
idle until its next burst. Connections are staggered evenly over the period, so only a few
are busy at any time while all of them have filled their pools to ``max_buffer_pages``: the
seed's "large number of network-backed volume devices" with I/O now and then.

Protocol on stdio: prints ``ready`` once every connection is up (with ``--watch-stdin`` it
then waits for a ``go`` line); runs for ``--seconds`` (with ``--watch-stdin``: or until
stdin closes or says ``quit``), then prints one JSON line of totals and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import threading
import time

import nbd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--exports", required=True, help="comma-separated export names")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--burst", type=int, default=4 << 20)
    parser.add_argument("--request", type=int, default=1 << 20)
    parser.add_argument("--period", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--offset-span", type=int, default=256 << 20)
    parser.add_argument(
        "--watch-stdin",
        action="store_true",
        help="wait for 'go' before the first burst; stop at 'quit' or when stdin closes",
    )
    args = parser.parse_args(argv)

    names = [n for n in args.exports.split(",") if n]
    handles: list[nbd.NBD] = []
    for name in names:
        for _ in range(args.connections):
            h = nbd.NBD()
            h.set_export_name(name)
            h.connect_unix(args.socket)
            handles.append(h)
    data = nbd.Buffer.from_bytearray(bytearray(os.urandom(64)) * (args.request // 64))
    per_burst = max(1, args.burst // args.request)
    n = len(handles)
    print("ready", flush=True)
    if args.watch_stdin and sys.stdin.readline().strip() != "go":
        return 1

    stop = threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "quit":
                break
        stop.set()

    if args.watch_stdin:
        threading.Thread(target=watch_stdin, daemon=True).start()

    start = time.monotonic()
    next_at = [start + args.period * i / n for i in range(n)]
    burst_started = [0.0] * n
    offsets = [0] * n
    bursts = 0
    errors = 0
    written = 0
    latencies: list[float] = []
    end = start + args.seconds
    poller = select.poll()
    while not stop.is_set():
        now = time.monotonic()
        if now >= end:
            break
        for i, h in enumerate(handles):
            if h.aio_in_flight() == 0:
                if burst_started[i]:
                    latencies.append(now - burst_started[i])
                    burst_started[i] = 0.0
                if now >= next_at[i]:
                    for _ in range(per_burst):
                        h.aio_pwrite(data, offsets[i])
                        offsets[i] = (offsets[i] + args.request) % args.offset_span
                    burst_started[i] = now
                    next_at[i] += args.period
                    if next_at[i] < now:  # fell behind: skip, do not pile up
                        next_at[i] = now + args.period
                    bursts += 1
                    written += per_burst * args.request
        busy = [h for h in handles if h.aio_in_flight() > 0]
        fds: dict[int, nbd.NBD] = {}
        for h in busy:
            fd = h.aio_get_fd()
            d = h.aio_get_direction()
            ev = 0
            if d & nbd.AIO_DIRECTION_READ:
                ev |= select.POLLIN
            if d & nbd.AIO_DIRECTION_WRITE:
                ev |= select.POLLOUT
            fds[fd] = h
            poller.register(fd, ev)
        wait = min(next_at) - time.monotonic()
        timeout_ms = max(0, min(int(wait * 1000) + 1, 50))
        for fd, ev in poller.poll(timeout_ms):
            h = fds[fd]
            try:
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    h.aio_notify_read()
                elif ev & select.POLLOUT:
                    h.aio_notify_write()
            except nbd.Error:
                errors += 1
        for fd in fds:
            poller.unregister(fd)
        for h in busy:
            while True:
                try:
                    cookie = h.aio_peek_command_completed()
                except nbd.Error:  # nothing in flight at all
                    break
                if not cookie:
                    break
                try:
                    h.aio_command_completed(cookie)
                except nbd.Error:
                    errors += 1
    for h in handles:
        try:
            while h.aio_in_flight() > 0:
                h.poll(1000)
            h.shutdown()
        except nbd.Error:
            errors += 1
    latencies.sort()
    result = {
        "connections": n,
        "bursts": bursts,
        "bytes": written,
        "errors": errors,
        "data": "random bytes (64 random bytes repeated)",
        "seconds": time.monotonic() - start,
        "burst_s_median": latencies[len(latencies) // 2] if latencies else None,
        "burst_s_p95": latencies[int(len(latencies) * 0.95)] if latencies else None,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
