"""The embedded store: one SQLite file, owned by one process at a time.

WAL with ``synchronous=FULL``: a commit is on disk before ``enqueue`` returns, and group
commit (``notifier.batching``) keeps that to one fsync per batch. The process holds an
exclusive lock on ``<file>.lock`` while it runs, so at start every job still ``sending`` is
known to belong to a dead predecessor and goes back to the queue at once, not after a lease.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import urlsplit

import aiosqlite
import pydantic_core

from notifier.models import Enqueued, Job, JobStatus, NewJob, Outcome
from notifier.settings import Settings
from notifier.store import sql
from notifier.store.base import Store, StoreLocked, StoreUnavailable

SCHEMA_VERSION = 1

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    results TEXT,
    idempotency_key TEXT UNIQUE,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    run_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (channel, run_at) WHERE {sql.WAITING};
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_until) WHERE status = 'sending';
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (updated_at) WHERE {sql.FINAL};
"""


def database_path(url: str) -> Path:
    """``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db``."""
    path = urlsplit(url).path.removeprefix("/")
    if not path or path == ":memory:":
        raise ValueError("NOTIFIER_DATABASE_URL: SQLite needs a file, e.g. sqlite:///./notifier.db")
    return Path(path)


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


#: ``message`` and ``results`` are JSON text, moments epoch seconds.
ROWS = sql.JobRows(moment=_moment)


class SQLiteStore(Store):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock_file: IO[bytes] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(database_path(settings.database_url))

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_ownership()
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=5000"):
                await self._db.execute(f"PRAGMA {pragma}")
            await self._db.executescript(SCHEMA)
            await self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc

    def _take_ownership(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        handle = open(lock_path, "wb")  # noqa: SIM115 - held open for the store's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreLocked(
                f"{self.path} is in use by another notifier process; SQLite serves one process,"
                " use PostgreSQL (NOTIFIER_DATABASE_URL=postgresql://...) to run several"
            ) from None
        self._lock_file = handle

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("the store is not open")
        return self._db

    async def _run(self, statement: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """One statement, which in autocommit mode is one atomic, durable transaction.

        Every verb is a single statement on purpose: one hop to aiosqlite's thread and one
        fsync per call, and no multi-statement transaction to interleave on the connection.
        """
        try:
            return list(await self.db.execute_fetchall(statement, params))
        except (sqlite3.Error, ValueError) as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def _count(self, statement: str, params: Sequence[Any] = ()) -> int:
        try:
            async with self.db.execute(statement, params) as cursor:
                return cursor.rowcount
        except (sqlite3.Error, ValueError) as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def ping(self) -> None:
        await self._run("SELECT 1")

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[Enqueued]:
        now = time.time()
        rows = [
            [
                job.message.id,
                job.message.channel,
                job.message.to_dict(),
                job.idempotency_key,
                job.run_at.timestamp() if job.run_at else now,
            ]
            for job in jobs
        ]
        # A key already stored, or given twice in this batch, conflicts and is skipped.
        inserted = await self._run(
            "INSERT INTO jobs (id, channel, status, message, idempotency_key, created_at,"
            " updated_at, run_at) SELECT json_extract(value, '$[0]'),"
            " json_extract(value, '$[1]'), 'queued', json_extract(value, '$[2]'),"
            " json_extract(value, '$[3]'), ?1, ?1, json_extract(value, '$[4]')"
            " FROM json_each(?2) WHERE true"
            " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
            (now, pydantic_core.to_json(rows).decode()),
        )
        new_ids = {row[0] for row in inserted}
        if new_ids:
            self._notify_work()
        skipped = [j.idempotency_key for j in jobs if j.message.id not in new_ids]
        known = await self._ids_for_keys([key for key in skipped if key is not None])
        return [
            Enqueued(job.message.id)
            if job.message.id in new_ids
            else Enqueued(known[job.idempotency_key or ""], duplicate=True)
            for job in jobs
        ]

    async def _ids_for_keys(self, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        rows = await self._run(
            "SELECT idempotency_key, id FROM jobs WHERE idempotency_key IN"
            " (SELECT value FROM json_each(?))",
            (json.dumps(keys),),
        )
        return {key: job_id for key, job_id in rows}

    async def claim(
        self, channel: str, *, owner: str, limit: int, lease_seconds: float
    ) -> list[Job]:
        now = time.time()
        rows = await self._run(
            f"UPDATE jobs SET status = 'sending', attempts = attempts + 1, lease_owner = ?,"
            f" lease_until = ?, updated_at = ? WHERE id IN (SELECT id FROM jobs"
            f" WHERE channel = ? AND {sql.WAITING} AND run_at <= ? ORDER BY run_at LIMIT ?)"
            f" RETURNING {sql.COLUMNS}",
            (owner, now + lease_seconds, now, channel, now, limit),
        )
        return sorted((ROWS.job(row) for row in rows), key=lambda job: job.run_at)

    async def record(self, owner: str, outcomes: Sequence[Outcome]) -> list[bool]:
        payload = json.dumps(
            [
                {
                    "id": o.job_id,
                    "status": o.status.value,
                    "last_error": o.last_error,
                    "run_at": o.run_at.timestamp() if o.run_at else None,
                    "results": json.dumps(o.results) if o.results else None,
                }
                for o in outcomes
            ]
        )
        rows = await self._run(
            "UPDATE jobs SET status = o.status, last_error = o.last_error,"
            " run_at = coalesce(o.run_at, jobs.run_at),"
            " results = coalesce(o.results, jobs.results), updated_at = ?,"
            " lease_owner = NULL, lease_until = NULL"
            " FROM (SELECT json_extract(value, '$.id') AS id,"
            " json_extract(value, '$.status') AS status,"
            " json_extract(value, '$.last_error') AS last_error,"
            " json_extract(value, '$.run_at') AS run_at,"
            " json_extract(value, '$.results') AS results FROM json_each(?)) AS o"
            " WHERE jobs.id = o.id AND jobs.status = 'sending' AND jobs.lease_owner = ?"
            " RETURNING jobs.id",
            (time.time(), payload, owner),
        )
        applied = {row[0] for row in rows}
        if any(o.status is JobStatus.RETRYING for o in outcomes):
            self._notify_work()
        return [o.job_id in applied for o in outcomes]

    async def extend_leases(self, owner: str, job_ids: Sequence[str], lease_seconds: float) -> None:
        await self._run(
            "UPDATE jobs SET lease_until = ? WHERE status = 'sending' AND lease_owner = ?"
            " AND id IN (SELECT value FROM json_each(?))",
            (time.time() + lease_seconds, owner, json.dumps(list(job_ids))),
        )

    async def release(self, owner: str, job_ids: Sequence[str]) -> None:
        await self._requeue(
            "lease_owner = ? AND id IN (SELECT value FROM json_each(?))",
            (owner, json.dumps(list(job_ids))),
            reason=sql.INTERRUPTED_BY_SHUTDOWN,
        )

    async def recover(self, *, owner: str) -> int:
        # The file lock proves every other owner is gone; our own leases can only have run out.
        return await self._requeue(
            "(lease_owner IS NOT ? OR lease_until < ?)",
            (owner, time.time()),
            reason="delivery interrupted: the process stopped during it; it will be tried again",
        )

    async def _requeue(self, where: str, params: tuple[Any, ...], *, reason: str) -> int:
        now = time.time()
        count = await self._count(
            "UPDATE jobs SET status = 'retrying', run_at = ?, updated_at = ?,"
            " lease_owner = NULL, lease_until = NULL, last_error = ?"
            f" WHERE status = 'sending' AND {where}",
            (now, now, reason, *params),
        )
        if count:
            self._notify_work()
        return count

    async def get(self, job_id: str) -> Job | None:
        rows = await self._run(f"SELECT {sql.COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return ROWS.job(rows[0]) if rows else None

    async def cancel(self, job_id: str) -> Job | None:
        rows = await self._run(
            "UPDATE jobs SET status = 'cancelled', updated_at = ?, lease_owner = NULL,"
            f" lease_until = NULL WHERE id = ? AND NOT {sql.FINAL} RETURNING {sql.COLUMNS}",
            (time.time(), job_id),
        )
        return ROWS.job(rows[0]) if rows else await self.get(job_id)

    async def next_due(self, channel: str) -> datetime | None:
        rows = await self._run(
            f"SELECT min(run_at) FROM jobs WHERE channel = ? AND {sql.WAITING}", (channel,)
        )
        value = rows[0][0] if rows else None
        return _moment(value) if value is not None else None

    async def count_by_status(self) -> dict[JobStatus, int]:
        return sql.status_counts(
            await self._run("SELECT status, count(*) FROM jobs GROUP BY status")
        )

    async def list_jobs(
        self, *, status: JobStatus | None, since: datetime | None, limit: int
    ) -> list[Job]:
        rows = await self._run(
            f"SELECT {sql.COLUMNS} FROM jobs WHERE (? IS NULL OR status = ?) AND updated_at >= ?"
            " ORDER BY updated_at DESC LIMIT ?",
            (status, status, since.timestamp() if since else 0.0, limit),
        )
        return [ROWS.job(row) for row in rows]

    async def retry(self, *, job_ids: Sequence[str] | None, since: datetime | None) -> list[str]:
        now = time.time()
        rows = await self._run(
            "UPDATE jobs SET status = 'queued', attempts = 0, run_at = ?, updated_at = ?"
            " WHERE status = 'failed' AND (? IS NULL OR id IN (SELECT value FROM json_each(?)))"
            " AND updated_at >= ? RETURNING id",
            (
                now,
                now,
                *([None, None] if job_ids is None else [1, json.dumps(list(job_ids))]),
                since.timestamp() if since else 0.0,
            ),
        )
        if rows:
            self._notify_work()
        return [row[0] for row in rows]

    async def purge(self, *, before: datetime) -> int:
        return await self._count(
            f"DELETE FROM jobs WHERE {sql.FINAL} AND updated_at < ?", (before.timestamp(),)
        )
