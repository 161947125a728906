"""The ``virtnet`` command line: subcommands dispatched lazily to their modules.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
A :class:`~virtnet.errors.UsageError` becomes a one-line message and exit
status 2; a :class:`~virtnet.errors.PeerError` that escapes (it should not)
becomes exit status 1 with its message.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from virtnet import __version__
from virtnet.errors import PeerError, UsageError

__all__ = ["SUBCOMMANDS", "main"]

#: name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("virtnet.demo", "driver and device on shared memory; no root, no VM"),
    "serve": ("virtnet.vhost_user.serve", "vhost-user backend for QEMU / DPDK guests"),
    "stats": ("virtnet.vhost_user.stats", "show live per-queue counters of a running serve"),
    "ctl": ("virtnet.vhost_user.control", "add, remove or change VMs of a running serve"),
    "pktgen": ("virtnet.pktgen", "packet generator driving any vhost-user backend"),
    "rr": ("virtnet.rr", "request/response transactions per second across sessions"),
    "xenstored": ("virtnet.xen.xenstored", "XenStore daemon on a Unix socket"),
    "xen": ("virtnet.xen.cli", "Xen netfront/netback: demo, back, front"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, helptext) in SUBCOMMANDS.items():
        spec = importlib.util.find_spec(mod)
        if spec is not None:
            out[name] = (mod, helptext)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="virtnet",
        description="Multiqueue paravirtual network device (virtio-net MQ, Xen netif)",
    )
    parser.add_argument("--version", action="version", version=f"virtnet {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = _available()
    wanted = None
    args_list = list(sys.argv[1:] if argv is None else argv)
    for a in args_list:
        if not a.startswith("-"):
            wanted = a
            break
    for name, (mod, helptext) in available.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name == wanted:
            module = importlib.import_module(mod)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args))
    except UsageError as exc:
        print(f"virtnet {args.command}: {exc}", file=sys.stderr)
        return 2
    except PeerError as exc:
        print(f"virtnet {args.command}: peer error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
