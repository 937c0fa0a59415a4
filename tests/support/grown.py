"""Grown job tables, written by SQL in the store's own schema rather than sent one by one.

Jobs queued for later (due in a year) and finished ones (delivered 60 to 30 days ago, older
than any retention test's cutoff), as intake and delivery would have left them; the finished
jobs are added to ``job_totals`` as the statement that finishes a job would have. Used by
the plan tests (tests/test_store.py, tests/test_postgres.py) and by ``bench.bench_tables``.
"""

from __future__ import annotations

import secrets
import sqlite3
from datetime import timedelta
from pathlib import Path

import asyncpg

from notifier.models import JobStatus, utcnow
from notifier.store.sqlite import NOW

DAY = 86400.0
#: Finished jobs were last changed between 60 and 30 days ago, evenly.
FINISHED_SINCE = 60 * DAY
FINISHED_OVER = 30 * DAY

_SQLITE_ROWS = (
    "WITH RECURSIVE n(i) AS (SELECT 1 WHERE ?1 > 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)"
    " INSERT INTO jobs (id, channel, status, message, attempts, results, created_at,"
    " updated_at, run_at, priority)"
    " SELECT ?2 || printf('%012d', i), 'sms', ?3,"
    " json_object('to', json_array(printf('+86138%08d', i % 100000000)), 'text', 'Code 1234.'),"
    " ?4, ?5, ?6, ?6 + i * ?8, ?7, 1 FROM n"
)

_POSTGRES_ROWS = (
    "INSERT INTO jobs (id, channel, status, message, attempts, results, created_at,"
    " updated_at, run_at, priority)"
    " SELECT $2 || lpad(g::text, 12, '0'), 'sms', $3,"
    " jsonb_build_object('to', jsonb_build_array('+86138' || lpad((g % 100000000)::text, 8, '0')),"
    " 'text', 'Code 1234.'), $4, $5::jsonb, $6::timestamptz,"
    " $6 + g * make_interval(secs => $8), $7::timestamptz, 1"
    " FROM generate_series(1, $1) AS g"
)

_DELIVERED = '{"delivered": {}}'


#: Status, attempts and results of each kind of row.
_KINDS = {
    "later": ("queued", 0, None),
    "due": ("queued", 0, None),
    "done": ("delivered", 1, _DELIVERED),
}


def _spread(finished: int) -> float:
    """Seconds between finished jobs: they finished one after another from 60 to 30 days
    ago, so a cutoff in between purges a share of them."""
    return FINISHED_OVER / max(finished, 1)


def _kind(kind: str) -> tuple[object, ...]:
    """An id prefix unlike any other call's (and any uuid4 hex of intake), and the kind's
    status, attempts and results."""
    return (f"{kind}-{secrets.token_hex(4)}-", *_KINDS[kind])


def grow_sqlite(path: Path, *, queued: int, finished: int, due: int = 0) -> None:
    """Add the rows to the SQLite file at ``path`` (its store may be open: WAL); ``due``
    jobs more, due a minute ago (a backlog)."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        now = db.execute(f"SELECT {NOW}").fetchone()[0]
        db.execute("BEGIN IMMEDIATE")
        db.execute(_SQLITE_ROWS, (queued, *_kind("later"), now, now + 365 * DAY, 0))
        db.execute(_SQLITE_ROWS, (due, *_kind("due"), now, now - 60, 0))
        old = now - FINISHED_SINCE
        db.execute(_SQLITE_ROWS, (finished, *_kind("done"), old, old, _spread(finished)))
        db.execute("UPDATE job_totals SET n = n + ? WHERE status = 'delivered'", (finished,))
        db.execute("COMMIT")
        db.execute("ANALYZE")
    finally:
        db.close()


async def grow_postgres(url: str, *, queued: int, finished: int, due: int = 0) -> None:
    """Add the rows to the PostgreSQL database at ``url`` and analyze them; ``due`` jobs
    more, due a minute ago (a backlog)."""
    conn = await asyncpg.connect(url)
    try:
        now = utcnow()
        later = now + timedelta(days=365)
        await conn.execute(_POSTGRES_ROWS, queued, *_kind("later"), now, later, 0.0)
        backlog = now - timedelta(minutes=1)
        await conn.execute(_POSTGRES_ROWS, due, *_kind("due"), now, backlog, 0.0)
        old = now - timedelta(seconds=FINISHED_SINCE)
        await conn.execute(_POSTGRES_ROWS, finished, *_kind("done"), old, old, _spread(finished))
        await conn.execute(
            "INSERT INTO job_totals (shard, status, n) VALUES (0, $1, $2)"
            " ON CONFLICT (shard, status) DO UPDATE SET n = job_totals.n + excluded.n",
            JobStatus.DELIVERED.value,
            finished,
        )
        await conn.execute("VACUUM ANALYZE jobs")
    finally:
        await conn.close()
