"""``notifier serve``: run the service on the settings from the environment and ``.env``.

Exit codes: 0 after a clean stop, 2 when the configuration is refused (before anything
starts: one line per problem, each naming its variable), 1 when a part cannot start (a port
in use, the store unreachable or locked); never a traceback for either.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from notifier.logs import configure_logging
from notifier.settings import SettingsError, load_settings
from notifier.store import StoreUnavailable


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the service",
        description="Run notifier: listen for jobs, store them and deliver them. Configured by"
        " NOTIFIER_* environment variables or a .env file (see .env.example). Exits 2 when"
        " the configuration is refused, 1 when a part cannot start.",
    )
    parser.set_defaults(handler=serve)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (a dependency except on Windows): faster sockets."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def serve(args: argparse.Namespace) -> int:
    from notifier.service import Service

    try:
        settings = load_settings()
        configure_logging(format=settings.log_format, level=settings.log_level)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(Service(settings).serve())
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"notifier: {problem}", file=sys.stderr)
        return 2
    except (StoreUnavailable, OSError) as exc:
        print(f"notifier: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
