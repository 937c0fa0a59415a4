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
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import urlsplit

import aiosqlite
import pydantic_core

from notifier.models import (
    FINAL_STATUSES,
    CallbackBacklog,
    Enqueued,
    Event,
    EventOutcome,
    Job,
    JobSearch,
    JobStatus,
    MinuteOutcomes,
    NewJob,
    Outcome,
    Priority,
    ReceiptReport,
    Suppression,
    bare_address,
)
from notifier.settings import RecipientLimit, Settings
from notifier.store import sql
from notifier.store.base import Store, StoreLocked, StoreUnavailable

SCHEMA_VERSION = 3
#: Purge deletes at most this many jobs per statement, so that it never holds the one
#: writer for long: intake waits for one batch at most.
PURGE_BATCH = 1000

#: The moment now, in the epoch seconds every time column holds.
NOW = "((julianday('now') - 2440587.5) * 86400.0)"

#: The first ``to`` recipient in lower case, as the ``jobs_recipient`` index holds it.
RECIPIENT = "lower(json_extract(message, '$.to[0]'))"
FINAL_TOTALS = ", ".join(f"('{status.value}', 0)" for status in FINAL_STATUSES)

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
    lease_until REAL,
    priority INTEGER NOT NULL DEFAULT 1,
    collapse TEXT,
    superseded_by TEXT,
    callback_url TEXT,
    receipts TEXT
);
-- Claims read these in the order they take jobs (``sql.claim_order``); ``id`` is in them
-- because it is not the rowid, and ``status`` so that counts never read the table.
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (channel, run_at, id, status) WHERE {sql.WAITING};
CREATE INDEX IF NOT EXISTS jobs_due_by_priority ON jobs (channel, priority, run_at, id)
    WHERE {sql.WAITING};
CREATE INDEX IF NOT EXISTS jobs_collapse ON jobs (collapse)
    WHERE {sql.WAITING} AND collapse IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_until) WHERE status = 'sending';
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (updated_at) WHERE {sql.FINAL};

-- Finished jobs per status, kept by the triggers below: counting them never reads the
-- ever-growing finished part of the table.
CREATE TABLE IF NOT EXISTS job_totals (status TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT OR IGNORE INTO job_totals (status, n) VALUES {FINAL_TOTALS};

CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    type TEXT NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    run_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS events_due ON events (run_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS events_one_final ON events (job_id) WHERE type = 'job.final';

CREATE TABLE IF NOT EXISTS provider_refs (
    ref TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    recipient TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS provider_refs_job ON provider_refs (job_id);
CREATE TABLE IF NOT EXISTS receipt_orphans (
    ref TEXT NOT NULL,
    receipt TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS receipt_orphans_ref ON receipt_orphans (ref);

CREATE TABLE IF NOT EXISTS suppressions (
    address TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL
);

-- Sends counted by pacing: taken when a job is admitted, given back if its send fails.
CREATE TABLE IF NOT EXISTS recipient_sends (
    recipient TEXT NOT NULL,
    sent_at REAL NOT NULL,
    job_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS recipient_sends_by ON recipient_sends (recipient, sent_at);
CREATE INDEX IF NOT EXISTS recipient_sends_at ON recipient_sends (sent_at);
CREATE INDEX IF NOT EXISTS recipient_sends_job ON recipient_sends (job_id);
CREATE TABLE IF NOT EXISTS recipient_holds (recipient TEXT PRIMARY KEY, until REAL NOT NULL);

-- A newer job supersedes the waiting ones of its collapse value, in its own INSERT.
CREATE TRIGGER IF NOT EXISTS jobs_collapse AFTER INSERT ON jobs
WHEN NEW.collapse IS NOT NULL BEGIN
    UPDATE jobs SET status = 'cancelled', superseded_by = NEW.id, updated_at = NEW.updated_at
    WHERE collapse = NEW.collapse AND {sql.WAITING} AND id <> NEW.id;
END;
-- The outbox: a job's one final event, in the statement that makes it final.
CREATE TRIGGER IF NOT EXISTS jobs_final_event AFTER UPDATE OF status ON jobs
WHEN NEW.callback_url IS NOT NULL AND {sql.status_in(FINAL_STATUSES, "NEW.status")}
    AND NOT {sql.status_in(FINAL_STATUSES, "OLD.status")} BEGIN
    INSERT OR IGNORE INTO events (id, job_id, type, url, created_at, run_at)
    VALUES (lower(hex(randomblob(16))), NEW.id, 'job.final', NEW.callback_url,
            NEW.updated_at, NEW.updated_at);
END;
CREATE TRIGGER IF NOT EXISTS jobs_receipt_event AFTER UPDATE OF receipts ON jobs
WHEN NEW.callback_url IS NOT NULL AND NEW.receipts IS NOT OLD.receipts BEGIN
    INSERT INTO events (id, job_id, type, url, created_at, run_at)
    VALUES (lower(hex(randomblob(16))), NEW.id, 'job.receipt', NEW.callback_url, {NOW}, {NOW});
END;
-- Provider message ids of delivered recipients, so receipts find their job.
CREATE TRIGGER IF NOT EXISTS jobs_provider_refs AFTER UPDATE OF results ON jobs
WHEN NEW.channel <> 'email' AND NEW.results IS NOT OLD.results BEGIN
    INSERT OR IGNORE INTO provider_refs (ref, job_id, recipient)
    SELECT value, NEW.id, key FROM json_each(NEW.results, '$.delivered') WHERE type = 'text';
END;
-- A receipt that came before its delivery was recorded is applied once it is.
CREATE TRIGGER IF NOT EXISTS provider_refs_orphans AFTER INSERT ON provider_refs
WHEN EXISTS (SELECT 1 FROM receipt_orphans WHERE ref = NEW.ref) BEGIN
    UPDATE jobs SET receipts = json_patch(coalesce(receipts, '{{}}'), json_object(NEW.recipient,
        json((SELECT receipt FROM receipt_orphans WHERE ref = NEW.ref
              ORDER BY created_at DESC LIMIT 1))))
    WHERE id = NEW.job_id;
    DELETE FROM receipt_orphans WHERE ref = NEW.ref;
END;
CREATE TRIGGER IF NOT EXISTS jobs_tally AFTER UPDATE OF status ON jobs
WHEN ({sql.status_in(FINAL_STATUSES, "NEW.status")})
    <> ({sql.status_in(FINAL_STATUSES, "OLD.status")})
BEGIN
    UPDATE job_totals SET n = n + 1 WHERE status = NEW.status;
    UPDATE job_totals SET n = n - 1 WHERE status = OLD.status;
END;
CREATE TRIGGER IF NOT EXISTS jobs_untally AFTER DELETE ON jobs
WHEN {sql.status_in(FINAL_STATUSES, "OLD.status")} BEGIN
    UPDATE job_totals SET n = n - 1 WHERE status = OLD.status;
END;
CREATE TRIGGER IF NOT EXISTS jobs_purged AFTER DELETE ON jobs BEGIN
    DELETE FROM events WHERE job_id = OLD.id;
    DELETE FROM provider_refs WHERE job_id = OLD.id;
END;

-- Dashboard searches: written once per job (neither column changes after intake), and the
-- failed and failing jobs alone, which are few.
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE INDEX IF NOT EXISTS jobs_recipient ON jobs ({RECIPIENT});
CREATE INDEX IF NOT EXISTS jobs_failing ON jobs (updated_at) WHERE {sql.FAILING};
"""

#: Columns version 2 added to the jobs table of a version 1 file.
ADDED_COLUMNS = {
    "priority": "INTEGER NOT NULL DEFAULT 1",
    "collapse": "TEXT",
    "superseded_by": "TEXT",
    "callback_url": "TEXT",
    "receipts": "TEXT",
}

COLUMNS = sql.job_columns("json_object")

# The statements of the hot paths, whose plans tests/test_store.py checks on a grown table.


def _claim(oldest: bool) -> str:
    due = f"FROM jobs WHERE channel = ?4 AND {sql.WAITING} AND run_at <= ?3"
    chosen = sql.claim_order(due, oldest="?5" if oldest else None, limit="?6")
    return (
        "UPDATE jobs SET status = 'sending', attempts = attempts + 1, lease_owner = ?1,"
        f" lease_until = ?2, updated_at = ?3 WHERE id IN ({chosen})"
        f" RETURNING {sql.CLAIMED_COLUMNS}"
    )


#: ``(owner, lease_until, now, channel, oldest, limit)``, by whether ``oldest`` is above 0.
CLAIM = {oldest: _claim(oldest) for oldest in (False, True)}
#: ``(now, outcomes as JSON, owner)``.
RECORD = (
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
    " RETURNING jobs.id"
)
NEXT_DUE = f"SELECT min(run_at) FROM jobs WHERE channel = ? AND {sql.WAITING}"
GET = f"SELECT {COLUMNS} FROM jobs WHERE id = ?"
#: ``(cutoff, batch size)``.
PURGE = (
    "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs"
    f" WHERE {sql.FINAL} AND updated_at < ? LIMIT ?)"
)
COUNT_BY_STATUS = (
    f"SELECT status, count(*) FROM jobs WHERE {sql.WAITING} GROUP BY status"
    " UNION ALL SELECT 'sending', count(*) FROM jobs WHERE status = 'sending'"
    " UNION ALL SELECT status, n FROM job_totals"
)


def database_path(url: str) -> Path:
    """``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db``."""
    path = urlsplit(url).path.removeprefix("/")
    if not path or path == ":memory:":
        raise ValueError("NOTIFIER_DATABASE_URL: SQLite needs a file, e.g. sqlite:///./notifier.db")
    return Path(path)


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


#: ``message`` and ``results`` are JSON text (read with pydantic-core's parser, a quarter of
#: ``json.loads``'s time on a claimed message), moments epoch seconds.
ROWS = sql.JobRows(moment=_moment, document=pydantic_core.from_json)


class SQLiteStore(Store):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        #: Whether ``recipient_sends`` may hold a row (pacing counted a send, now or before
        #: this start): until then a failed delivery has no count to give back.
        self._sends_counted = False

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
            earlier = await self._upgrade(self._db)
            await self._db.executescript(SCHEMA)
            if earlier is not None and earlier < 3:
                await self._db.executescript(
                    "BEGIN; INSERT OR REPLACE INTO job_totals (status, n)"
                    f" SELECT status, count(*) FROM jobs WHERE {sql.FINAL} GROUP BY status;"
                    f" PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )
            else:
                await self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            counted = await self._db.execute_fetchall("SELECT 1 FROM recipient_sends LIMIT 1")
            self._sends_counted = bool(list(counted))
        except sqlite3.Error as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc

    @staticmethod
    async def _upgrade(db: aiosqlite.Connection) -> int | None:
        """Bring a file of an earlier version up to date before the schema script runs;
        returns the file's version, None for a new file.

        Version 3 rebuilt the due indexes (with ``id``, and ``status``) under their old
        names, and counts finished jobs in ``job_totals``, filled once from the table.
        """
        async with db.execute("PRAGMA table_info(jobs)") as cursor:
            present = {row[1] for row in await cursor.fetchall()}
        if not present:
            return None
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        for name, definition in ADDED_COLUMNS.items():
            if name not in present:
                await db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
        if version < 3:
            await db.executescript(
                "DROP INDEX IF EXISTS jobs_due; DROP INDEX IF EXISTS jobs_due_by_priority;"
            )
        return version

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
        # A committed write (the header's version, unchanged): reads still work on a full
        # disk, so only a write says whether jobs can be stored.
        await self._run(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[Enqueued]:
        now = time.time()
        rows = [
            [
                job.message.id,
                job.message.channel,
                job.message.to_dict(),
                job.idempotency_key,
                job.run_at.timestamp() if job.run_at else now,
                job.priority.rank,
                job.collapse,
                job.callback_url,
            ]
            for job in jobs
        ]
        # A key already stored, or given twice in this batch, conflicts and is skipped.
        inserted = await self._run(
            "INSERT INTO jobs (id, channel, status, message, idempotency_key, created_at,"
            " updated_at, run_at, priority, collapse, callback_url)"
            " SELECT value ->> 0, value ->> 1, 'queued', value ->> 2, value ->> 3, ?1, ?1,"
            " value ->> 4, value ->> 5, value ->> 6, value ->> 7"
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
        self, channel: str, *, owner: str, limit: int, lease_seconds: float, oldest: int = 0
    ) -> list[Job]:
        now = time.time()
        rows = await self._run(
            CLAIM[oldest > 0], (owner, now + lease_seconds, now, channel, oldest, limit)
        )
        return sql.in_claim_order(ROWS.job(row) for row in rows)

    async def record(self, owner: str, outcomes: Sequence[Outcome]) -> list[bool]:
        # ``results`` as a JSON object in the payload: json_extract gives back its text,
        # so it is encoded once, not a second time as a string inside the JSON.
        payload = pydantic_core.to_json(
            [
                {
                    "id": o.job_id,
                    "status": o.status.value,
                    "last_error": o.last_error,
                    "run_at": o.run_at.timestamp() if o.run_at else None,
                    "results": o.results or None,
                }
                for o in outcomes
            ]
        ).decode()
        rows = await self._run(RECORD, (time.time(), payload, owner))
        applied = {row[0] for row in rows}
        unsent = [
            o for o in outcomes if o.status is not JobStatus.DELIVERED and o.job_id in applied
        ]
        if unsent and self._sends_counted:  # give back what pacing counted for them
            await self._run(
                "DELETE FROM recipient_sends WHERE job_id IN (SELECT key FROM json_each(?1))"
                " AND recipient NOT IN (SELECT d.key FROM json_each(?1) AS o,"
                " json_each(o.value) AS d WHERE o.key = recipient_sends.job_id)",
                (json.dumps({o.job_id: o.results.get("delivered", {}) for o in unsent}),),
            )
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

    async def release_unheld(self, owner: str, channel: str, held: Collection[str]) -> int:
        return await self._requeue(
            "lease_owner = ? AND channel = ? AND id NOT IN (SELECT value FROM json_each(?))",
            (owner, channel, json.dumps(list(held))),
            reason=sql.CLAIM_ANSWER_LOST,
        )

    async def recover(self, *, owner: str) -> int:
        # The file lock proves every other owner is gone; our own leases can only have run out.
        await self._run(
            "UPDATE events SET lease_owner = NULL, lease_until = NULL"
            " WHERE state = 'pending' AND lease_owner IS NOT ?",
            (owner,),
        )
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
        rows = await self._run(GET, (job_id,))
        return ROWS.job(rows[0]) if rows else None

    async def cancel(self, job_id: str) -> Job | None:
        rows = await self._run(
            "UPDATE jobs SET status = 'cancelled', updated_at = ?, lease_owner = NULL,"
            f" lease_until = NULL WHERE id = ? AND NOT {sql.FINAL} RETURNING {COLUMNS}",
            (time.time(), job_id),
        )
        return ROWS.job(rows[0]) if rows else await self.get(job_id)

    async def next_due(self, channel: str) -> datetime | None:
        rows = await self._run(NEXT_DUE, (channel,))
        value = rows[0][0] if rows else None
        return _moment(value) if value is not None else None

    async def count_by_status(self) -> dict[JobStatus, int]:
        """Work in progress counted on the partial indexes, finished work from job_totals."""
        return sql.status_counts(await self._run(COUNT_BY_STATUS))

    async def count_waiting(self) -> dict[tuple[str, Priority], int]:
        return sql.waiting_counts(await self._run(sql.COUNT_WAITING))

    async def list_jobs(
        self, *, status: JobStatus | None, since: datetime | None, limit: int
    ) -> list[Job]:
        rows = await self._run(
            f"SELECT {COLUMNS} FROM jobs WHERE (? IS NULL OR status = ?) AND updated_at >= ?"
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
        cutoff = before.timestamp()
        await self._run("DELETE FROM recipient_sends WHERE sent_at < ?", (cutoff,))
        await self._run("DELETE FROM recipient_holds WHERE until < ?", (time.time(),))
        await self._run("DELETE FROM receipt_orphans WHERE created_at < ?", (cutoff,))
        total = 0
        while True:
            # A batch per statement: intake and claims queued meanwhile go in between.
            deleted = await self._count(PURGE, (cutoff, PURGE_BATCH))
            total += deleted
            if deleted < PURGE_BATCH:
                return total

    # -- traffic control ---------------------------------------------------------------------

    async def pace(
        self, owner: str, jobs: Sequence[Job], limits: Sequence[RecipientLimit]
    ) -> dict[str, datetime]:
        # One lane claims SMS in this process, so the check and the count cannot interleave.
        now = time.time()
        deferred: dict[str, float] = {}
        for job in jobs:
            recipients = json.dumps(list(job.pending_message().pending_to))
            until = await self._blocked_until(recipients, limits, now)
            if until is not None:
                deferred[job.id] = until
                continue
            await self._run(
                "INSERT INTO recipient_sends (recipient, sent_at, job_id)"
                " SELECT value, ?, ? FROM json_each(?)",
                (now, job.id, recipients),
            )
            self._sends_counted = True
        if deferred:
            await self._run(
                "UPDATE jobs SET status = CASE WHEN attempts > 1 THEN 'retrying' ELSE 'queued'"
                " END, attempts = attempts - 1, run_at = d.value, lease_owner = NULL,"
                " lease_until = NULL FROM json_each(?) AS d"
                " WHERE jobs.id = d.key AND jobs.status = 'sending' AND jobs.lease_owner = ?",
                (json.dumps(deferred), owner),
            )
        return {job_id: _moment(until) for job_id, until in deferred.items()}

    async def _blocked_until(
        self, recipients: str, limits: Sequence[RecipientLimit], now: float
    ) -> float | None:
        """When every one of ``recipients`` (a JSON list) may get a message again; None if now."""
        windows = json.dumps([[limit.count, limit.seconds] for limit in limits])
        rows = await self._run(
            "SELECT max(t) FROM ("
            " SELECT until AS t FROM recipient_holds"
            "  WHERE recipient IN (SELECT value FROM json_each(?1)) AND until > ?3"
            " UNION ALL"
            " SELECT min(s.sent_at) + (w.value ->> 1) AS t"
            "  FROM json_each(?1) AS r, json_each(?2) AS w"
            "  JOIN recipient_sends AS s ON s.recipient = r.value"
            "   AND s.sent_at > ?3 - (w.value ->> 1)"
            "  GROUP BY r.value, w.key HAVING count(*) >= (w.value ->> 0))",
            (recipients, windows, now),
        )
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None

    async def hold_recipients(self, holds: Mapping[str, datetime]) -> None:
        await self._run(
            "INSERT INTO recipient_holds (recipient, until) SELECT key, value FROM json_each(?)"
            " WHERE true ON CONFLICT (recipient) DO UPDATE SET until = max(until, excluded.until)",
            (json.dumps({number: until.timestamp() for number, until in holds.items()}),),
        )

    # -- suppression -------------------------------------------------------------------------

    async def suppressed(self, addresses: Collection[str]) -> dict[str, str]:
        if not addresses:
            return {}
        rows = await self._run(
            "SELECT address, reason FROM suppressions"
            " WHERE address IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(addresses)),),
        )
        return {address: reason for address, reason in rows}

    async def suppress(self, address: str, reason: str) -> None:
        await self._run(
            "INSERT INTO suppressions (address, reason, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT (address) DO NOTHING",
            (address, reason, time.time()),
        )

    async def unsuppress(self, address: str) -> bool:
        return bool(await self._count("DELETE FROM suppressions WHERE address = ?", (address,)))

    async def list_suppressions(self) -> list[Suppression]:
        rows = await self._run(
            "SELECT address, reason, created_at FROM suppressions ORDER BY created_at, address"
        )
        return [Suppression(address, reason, _moment(at)) for address, reason, at in rows]

    # -- callbacks and receipts --------------------------------------------------------------

    async def claim_events(self, *, owner: str, limit: int, lease_seconds: float) -> list[Event]:
        now = time.time()
        rows = await self._run(
            "UPDATE events SET attempts = attempts + 1, lease_owner = ?1, lease_until = ?2"
            " WHERE id IN (SELECT id FROM events WHERE state = 'pending' AND run_at <= ?3"
            " AND (lease_until IS NULL OR lease_until < ?3) ORDER BY run_at LIMIT ?4)"
            " RETURNING id, job_id, type, url, created_at, attempts",
            (owner, now + lease_seconds, now, limit),
        )
        if not rows:
            return []
        jobs = await self._run(
            f"SELECT {COLUMNS} FROM jobs WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps([row[1] for row in rows]),),
        )
        return sql.events(rows, {job.id: job for job in map(ROWS.job, jobs)}, _moment)

    async def record_events(self, owner: str, outcomes: Sequence[EventOutcome]) -> None:
        await self._run(
            "UPDATE events SET state = o.value ->> 1, last_error = o.value ->> 2,"
            " run_at = coalesce(o.value ->> 3, events.run_at), lease_owner = NULL,"
            " lease_until = NULL FROM json_each(?) AS o"
            " WHERE events.id = o.value ->> 0 AND events.lease_owner = ?",
            (
                json.dumps(
                    [
                        [o.event_id, o.state.value, o.last_error, o.run_at and o.run_at.timestamp()]
                        for o in outcomes
                    ]
                ),
                owner,
            ),
        )

    async def record_receipts(self, reports: Sequence[ReceiptReport]) -> list[bool]:
        return [await self._record_receipt(report) for report in reports]

    async def _provider_ref(self, ref: str) -> list[sqlite3.Row]:
        return await self._run(
            "SELECT p.job_id, p.recipient, j.channel, j.receipts FROM provider_refs p"
            " JOIN jobs j ON j.id = p.job_id WHERE p.ref = ?",
            (ref,),
        )

    async def _record_receipt(self, report: ReceiptReport) -> bool:
        if report.by == "provider_id":
            rows = await self._provider_ref(report.reference)
            if not rows:
                # One statement: the delivery that carries this id is recorded either before
                # it (nothing is kept, and the id is there now) or after it (and adopts it).
                kept = await self._run(
                    "INSERT INTO receipt_orphans (ref, receipt, created_at) SELECT ?1, ?2, ?3"
                    " WHERE NOT EXISTS (SELECT 1 FROM provider_refs WHERE ref = ?1)"
                    " RETURNING 1",
                    (report.reference, json.dumps(sql.receipt_patch("", report)[""]), time.time()),
                )
                if kept:
                    return False
                rows = await self._provider_ref(report.reference)
            job_id, recipient, channel, receipts = rows[0]
        else:
            rows = await self._run(
                "SELECT channel, message, results, receipts FROM jobs WHERE id = ?",
                (report.reference,),
            )
            if not rows:
                return False
            channel, message, results, receipts = rows[0]
            job_id = report.reference
            recipient = sql.match_recipient(
                sql.recipients_of(json.loads(message), json.loads(results or "{}")),
                report.recipient,
            )
            if recipient is None:
                return False
        known = json.loads(receipts or "{}")
        if sql.same_receipt(known.get(recipient), report):
            return True
        await self._run(
            "UPDATE jobs SET receipts = json_patch(coalesce(receipts, '{}'), ?) WHERE id = ?",
            (json.dumps(sql.receipt_patch(recipient, report)), job_id),
        )
        if channel == "email" and sql.is_hard_bounce(report):
            await self.suppress(bare_address(recipient), report.reason or "hard bounce")
        return True

    # -- dashboard ---------------------------------------------------------------------------

    async def search_jobs(self, search: JobSearch) -> list[Job]:
        params: list[Any] = []

        def param(value: Any) -> str:
            params.append(value)
            return "?"

        where = sql.search_where(
            search, param, recipient=RECIPIENT, moment=lambda at: at.timestamp()
        )
        rows = await self._run(
            f"SELECT {COLUMNS} FROM jobs WHERE {where} ORDER BY created_at DESC LIMIT ?",
            (*params, search.limit),
        )
        return [ROWS.job(row) for row in rows]

    async def recent_failures(self, limit: int) -> list[Job]:
        rows = await self._run(
            f"SELECT {COLUMNS} FROM jobs WHERE {sql.FAILING} ORDER BY updated_at DESC LIMIT ?",
            (limit,),
        )
        return [ROWS.job(row) for row in rows]

    async def outcomes_per_minute(self, since: datetime) -> list[MinuteOutcomes]:
        rows = await self._run(
            sql.OUTCOMES_PER_MINUTE.format(
                minute="CAST(updated_at / 60 AS INTEGER) * 60", since="?"
            ),
            (since.timestamp(),),
        )
        return sql.minute_outcomes(rows, _moment)

    async def callback_backlog(self) -> CallbackBacklog:
        ((pending, oldest),) = await self._run(sql.CALLBACK_BACKLOG)
        return CallbackBacklog(pending, _moment(oldest) if oldest is not None else None)
