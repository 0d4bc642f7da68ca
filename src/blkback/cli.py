"""The ``blkback`` command line: ``serve | ctl | pressure | repro | bench | sim | microbench``.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
this file only wires them up and turns expected errors into one clear line and exit code 2.
Command modules keep heavy imports inside ``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from blkback import __version__
from blkback.errors import BlkbackError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("blkback.server.command", "serve block devices over NBD"),
    "ctl": ("blkback.server.ctl_command", "parameters, statistics and pressure of a server"),
    "microbench": ("blkback.bench.microbench", "measure the page pool's get/put/shrink speed"),
    "pressure": ("blkback.pressure.command", "probe and watch the memory-pressure signals"),
    "sim": ("blkback.sim.command", "simulate Xen hosts: the seed's experiments, sweeps, fleets"),
    "bench": ("blkback.bench.command", "benchmark blkback against nbdkit and qemu-nbd with fio"),
    "repro": ("blkback.repro.command", "reproduce the seed's experiments on real memory pressure"),
}

# Subcommands reached under another command's name that live higher in the package map
# (docs/design.md): `pressure latency` is a benchmark, and pressure/ does not import bench/.
# The parent module's add_arguments returns its subparsers for these to join.
SUBCOMMANDS: dict[str, dict[str, tuple[str, str]]] = {
    "pressure": {
        "latency": (
            "blkback.bench.latency",
            "benchmark: how fast a report empties every idle ring (squeeze_wake on vs off)",
        )
    },
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all subcommands registered)."""
    parser = argparse.ArgumentParser(
        prog="blkback",
        description=(
            "A userspace NBD block backend with xen-blkback's per-ring page pools and the "
            "memory-pressure squeeze (Linux 5.6 buffer_squeeze_duration_ms)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"blkback {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeatable)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        subparsers = module.add_arguments(p)
        p.set_defaults(_module=module)
        for sub_name, (sub_module_name, sub_help) in SUBCOMMANDS.get(name, {}).items():
            sub_module = importlib.import_module(sub_module_name)
            q = subparsers.add_parser(
                sub_name,
                help=sub_help,
                description=sub_module.__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            sub_module.add_arguments(q)
            q.set_defaults(_module=sub_module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (never calls sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(
        level=level, format="blkback: %(levelname)s: %(message)s", stream=sys.stderr
    )
    try:
        code: int = args._module.run(args)
    except BlkbackError as exc:
        print(f"blkback {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blkback {args.command}: interrupted", file=sys.stderr)
        return 130
    return code
