"""Throwaway PostgreSQL databases for tests.

The server comes from ``NOTIFIER_TEST_POSTGRES_URL`` (CI sets it, and then an unreachable
server fails the run); without it the default local server is tried, and the tests that need
it are skipped only when nothing answers there. Each test module gets its own database,
``notifier_test_<random>``, dropped at the end; each test that asks for ``postgres_url``
starts from an empty schema in it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

URL_VARIABLE = "NOTIFIER_TEST_POSTGRES_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
UNREACHABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def fetchval(url: str, query: str) -> object:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def terminate_backends(admin_url: str, database: str) -> int:
    """``pg_terminate_backend`` every connection to ``database``; how many there were."""
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        killed: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        return killed
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """A URL of the test server's admin database; fails or skips as the module says."""
    configured = os.environ.get(URL_VARIABLE)
    url = configured or DEFAULT_URL
    try:
        asyncio.run(fetchval(url, "SELECT 1"))
    except UNREACHABLE as exc:
        if configured:
            pytest.fail(f"{URL_VARIABLE}={url}: PostgreSQL is unreachable: {exc!r}")
        pytest.skip(f"no PostgreSQL at {url} ({exc!r}); set {URL_VARIABLE} to run these tests")
    return url


@contextmanager
def fresh_database(admin_url: str, prefix: str = "notifier_test") -> Iterator[str]:
    """A new database on the server of ``admin_url``, dropped (connections and all) after."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    asyncio.run(execute(admin_url, f"CREATE DATABASE {name}"))
    try:
        yield with_database(admin_url, name)
    finally:
        asyncio.run(execute(admin_url, f"DROP DATABASE {name} WITH (FORCE)"))


@pytest.fixture(scope="module")
def postgres_database(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database for the module."""
    with fresh_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """The module's database with an empty schema: every test migrates from scratch."""
    asyncio.run(
        execute(
            postgres_database,
            "DROP SCHEMA public CASCADE",
            "CREATE SCHEMA public",
        )
    )
    return postgres_database
