"""The PostgreSQL store: one durable queue shared by several notifier instances.

``store`` holds the verbs, ``schema`` the versioned migrations, ``listener`` the LISTEN
connection that wakes idle dispatchers, ``heartbeat`` the thread that keeps the instance alive.
"""

from notifier.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
