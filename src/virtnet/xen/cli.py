"""``virtnet xen {demo,back,front}``: the Xen subcommands, dispatched to their modules.

Each target module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["XEN_COMMANDS", "add_arguments", "run"]

#: name -> (module, one-line help)
XEN_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("virtnet.xen.demo", "xenstored + netback + netfront; traffic on every queue"),
    "back": ("virtnet.xen.netback", "netback for one vif (dom0 side)"),
    "front": ("virtnet.xen.netfront", "netfront for one vif (guest side) with a traffic check"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="xen_command", metavar="XEN_COMMAND", required=True)
    for name, (mod, helptext) in XEN_COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        module = importlib.import_module(mod)
        module.add_arguments(p)
        p.set_defaults(_xen_module=module)


def run(args: argparse.Namespace) -> int:
    return int(args._xen_module.run(args))
