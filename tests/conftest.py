"""Shared fixtures live in tests/support; each module is registered here."""

pytest_plugins: list[str] = [
]
