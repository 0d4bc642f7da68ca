"""How each server's CPU per request in a bench run depends on the repeat and its start position.

``blkback bench`` starts every server afresh each repeat, in an order rotated by one per
repeat, and reports medians over repeats. This prints, per server and repeat, the mean over
workloads of the server's µs per request divided by its median over the repeats, with the
server's position in that repeat's order (0: started and prefilled first, and first in every
workload). A repeat that is slow for every server is the machine drifting; one that is slow
for whichever server is at position 0 is the order itself (docs/bench/README.md).

Usage: python3 scripts/measure/bench_positions.py docs/bench/results.json [more.json ...]
"""

from __future__ import annotations

import json
import statistics
import sys


def positions(path: str) -> list[str]:
    """One line per server: its relative CPU per request in each repeat, with its position."""
    with open(path) as f:
        results = json.load(f)
    servers: list[str] = results["config"]["servers"]
    us = {
        (c["workload"], c["repeat"], c["server"]): c["server_us_per_op"]
        for c in results["cells"]
        if c.get("server_us_per_op")
    }
    workloads = sorted({k[0] for k in us})
    repeats = sorted({k[1] for k in us})
    lines = []
    for server in servers:
        cols = []
        for rep in repeats:
            rel = []
            for w in workloads:
                runs = [us.get((w, q, server)) for q in repeats]
                if all(runs):
                    rel.append(us[(w, rep, server)] / statistics.median(runs))
            if not rel:
                continue
            pos = (servers.index(server) - rep) % len(servers)
            cols.append(f"r{rep} (position {pos}) {statistics.mean(rel):.2f}")
        if cols:
            lines.append(f"{server:16s} " + "   ".join(cols))
    return lines


def main() -> None:
    for path in sys.argv[1:]:
        print(path)
        for line in positions(path):
            print("  " + line)


if __name__ == "__main__":
    main()
