"""``notifier migrate``: bring the PostgreSQL schema up to date, or check that it is.

Instances migrate by themselves at start (under an advisory lock, so starting several at once
is safe); this command lets a deployment migrate first, or hold a rollout until it has.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from notifier.settings import Settings, SettingsError, load_settings
from notifier.store import backend_for


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="apply pending database schema migrations",
        description="Apply the pending schema migrations of the PostgreSQL store named by"
        " NOTIFIER_DATABASE_URL. The SQLite store migrates itself when it opens.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="apply nothing; exit 1 if migrations are pending",
    )
    parser.set_defaults(handler=migrate)


def migrate(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"notifier: {exc}", file=sys.stderr)
        return 2
    if not backend_for(settings.database_url).startswith("notifier.store.postgres"):
        print("nothing to migrate: the SQLite store migrates itself when it opens")
        return 0
    from notifier.store.postgres.store import DATABASE_ERRORS

    try:
        return asyncio.run(_migrate(settings, check=args.check))
    except DATABASE_ERRORS as exc:
        print(f"notifier: cannot migrate: {exc}", file=sys.stderr)
        return 1


async def _migrate(settings: Settings, *, check: bool) -> int:
    import asyncpg

    from notifier.store.postgres import schema
    from notifier.store.postgres.store import connect_options

    conn = await asyncpg.connect(**connect_options(settings))
    try:
        if check:
            pending = await schema.pending_migrations(conn)
            for migration in pending:
                print(f"pending migration {migration.version} ({migration.name})")
        else:
            pending = []
            for migration in await schema.migrate(conn):
                print(f"applied migration {migration.version} ({migration.name})")
    finally:
        await conn.close()
    if not pending:
        print(f"schema is at version {schema.LATEST}")
    return 1 if pending else 0
