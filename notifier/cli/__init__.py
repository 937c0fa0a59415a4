"""The ``notifier`` command: ``serve`` runs the service, the other commands talk to it.

Each command lives in its own module with ``register(subparsers)``, which adds its parser and
sets ``handler`` to a function taking the parsed arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "notifier.cli.serve",
    "notifier.cli.templates",
    "notifier.cli.client",
    "notifier.cli.send_many",
    "notifier.cli.migrate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="notifier",
        description="Durable email and SMS delivery over a JSON-lines TCP protocol.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


def run() -> None:
    sys.exit(main())
