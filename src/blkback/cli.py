"""The ``blkback`` command line: ``serve | ctl | pressure | repro | bench | sim | microbench``.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
this file only wires them up and turns expected errors into one clear line and an exit code:
2 for a usage error (:class:`ConfigError`), 1 for a failure at run time (any other
:class:`BlkbackError`, e.g. no server at the control socket, an address in use).
Command modules keep heavy imports inside ``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from blkback import __version__
from blkback.errors import BlkbackError, ConfigError

VERBOSE_HELP = (
    "more log output: -v an operator's view (connections, refused exports, errors returned "
    "to clients, squeezes, log_stats lines), -vv every request too"
)

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


def _accept_verbose(parser: argparse.ArgumentParser, depth: int = 1) -> None:
    """Accept ``-v`` after a command and after its actions (``blkback pressure watch -v``).

    Each level counts into its own ``verbose_<depth>``, summed by :func:`verbosity`: a
    subcommand's namespace overwrites its parent's values of the same name, so one shared
    count would lose the ``-v`` given before the command.
    """
    parser.add_argument(
        "-v", "--verbose", dest=f"verbose_{depth}", action="count", default=0, help=VERBOSE_HELP
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _accept_verbose(sub, depth + 1)


def verbosity(args: argparse.Namespace) -> int:
    """How many ``-v`` were given, wherever they stand on the command line."""
    return sum(v for k, v in vars(args).items() if k.startswith("verbose") and isinstance(v, int))


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
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
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
        _accept_verbose(p)
    return parser


def _warnings_unless_ours(record: logging.LogRecord) -> bool:
    """Let a record through if it is blkback's, or a library's warning or worse."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] == "blkback"


def setup_logging(verbosity: int) -> None:
    """blkback's own loggers at WARNING, INFO (-v) or DEBUG (-vv) on stderr; libraries'
    records (dask, matplotlib, ...) only from WARNING up, whatever level they set for
    themselves (distributed sets its own loggers to INFO)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("blkback: %(levelname)s: %(message)s"))
    handler.addFilter(_warnings_unless_ours)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("blkback").setLevel(logging.WARNING - 10 * min(verbosity, 2))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (never calls sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbosity(args))
    try:
        code: int = args._module.run(args)
    except ConfigError as exc:
        print(f"blkback {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BlkbackError as exc:
        print(f"blkback {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"blkback {args.command}: interrupted", file=sys.stderr)
        return 130
    return code
