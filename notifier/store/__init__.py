"""Job stores: one interface, a backend per URL scheme, imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from notifier.store.base import Store, StoreLocked, StoreUnavailable

if TYPE_CHECKING:
    from notifier.settings import Settings

__all__ = ["BACKENDS", "Store", "StoreLocked", "StoreUnavailable", "backend_for", "open_store"]

BACKENDS: dict[str, str] = {
    "sqlite": "notifier.store.sqlite:SQLiteStore",
    "postgresql": "notifier.store.postgres:PostgresStore",
    "postgres": "notifier.store.postgres:PostgresStore",
}


def backend_for(url: str) -> str:
    """The import string of the store class that serves ``url``; empty if none does."""
    return BACKENDS.get(urlsplit(url).scheme.split("+", 1)[0], "")


def open_store(settings: Settings) -> Store:
    """The (not yet opened) store that ``settings.database_url`` names."""
    url = settings.database_url
    target = backend_for(url)
    if not target:
        known = ", ".join(sorted(BACKENDS))
        scheme = urlsplit(url).scheme
        raise ValueError(f"NOTIFIER_DATABASE_URL: unknown scheme {scheme!r} (known: {known})")
    module_name, _, class_name = target.partition(":")
    backend: type[Store] = getattr(importlib.import_module(module_name), class_name)
    return backend.from_settings(settings)
