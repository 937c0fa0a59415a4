"""Shared fixtures live in tests/support; each module is registered here."""

pytest_plugins: list[str] = [
    "tests.support.smtp",
    "tests.support.http_sink",
    "tests.support.postgres",
    "tests.support.dovecot",
    "tests.support.tmpfs",
    "tests.support.readonly",
    "tests.support.pgcluster",
]
