"""The ``gcibsem`` command: one entry point, sub-commands contributed by each package.

Each package owns a ``register(subparsers)`` function next to its code, so this
module stays a thin dispatcher and a newcomer finds a command's code in the
package it belongs to.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module path of each package's command registry, in the order they are listed in --help
COMMAND_MODULES = (
    "hardware.cli",
    "hardware.instruments.cli",
    "gcib.cli",
    "acquisition.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gcibsem", description="Wafer-based GCIB-SEM acquisition tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that package has no commands yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hardware.errors import HardwareError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HardwareError as exc:
        print(f"gcibsem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:    # a missing, unwritable or full disk's file too: named, no traceback
        print(f"gcibsem {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
