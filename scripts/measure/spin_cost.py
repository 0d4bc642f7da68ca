"""CPU per iteration of the ways a ring can spin on an empty socket (docs/data-path.md §3).

Usage: .venv/bin/python scripts/measure/spin_cost.py [ITERATIONS]
A recv(MSG_DONTWAIT) on an empty socket raises BlockingIOError; a poll with a zero timeout
returns an empty list. Each with and without a monotonic clock read per iteration.
"""
import select, socket, sys, time

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
buf = memoryview(bytearray(65536))
now = time.monotonic_ns
far = now() + 10**15


def recv_raises(clock: bool) -> None:
    recv, flags = a.recv_into, socket.MSG_DONTWAIT
    for _ in range(n):
        try:
            recv(buf, 0, flags)
        except BlockingIOError:
            if clock and now() >= far:
                break


def poll_zero(clock: bool) -> None:
    p = select.poll()
    p.register(a.fileno(), select.POLLIN)
    ready = p.poll
    for _ in range(n):
        if ready(0) or (clock and now() >= far):
            break


for _ in range(2):
    for f in (recv_raises, poll_zero):
        for clock in (False, True):
            t = time.process_time_ns()
            f(clock)
            ns = (time.process_time_ns() - t) / n
            print(f"{f.__name__:12s} clock={clock!s:5s} {ns:7.0f} ns CPU per iteration")
