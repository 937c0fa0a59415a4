"""The shared store: several notifier instances on one PostgreSQL database.

What keeps it a good job queue where many are not:

- Intake commits a whole batch in one statement (one multi-row INSERT over arrays, one round
  trip when nothing collapses) that sends at most one NOTIFY; there are no per-row triggers
  to throttle inserts.
- Claims take a batch with ``FOR UPDATE SKIP LOCKED`` from a partial index that holds only
  waiting work, in the index's own order, so instances never block each other and the plan
  does not depend on fresh statistics. No transaction stays open during a delivery.
- Takeover is by liveness, not by age: each instance heartbeats every second (from a thread
  with its own connection, so a busy event loop or a busy pool does not stop it), and
  one instance at a time (an advisory lock) requeues the work of instances whose heartbeat
  stopped, and work whose lease ran out. A live instance extends the leases of its slow
  deliveries, so they are never rescued while they still run.
- Every database or network failure surfaces as ``StoreUnavailable``; the pool replaces
  broken connections by itself, so everything resumes when the database is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pydantic_core

from notifier.models import (
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
from notifier.store.base import Store, StoreUnavailable
from notifier.store.postgres import schema
from notifier.store.postgres.heartbeat import BEAT, Heartbeat
from notifier.store.postgres.listener import Listener

if TYPE_CHECKING:
    from notifier.store.postgres.schema import AnyConnection

log = logging.getLogger("notifier.store.postgres")

DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    schema.SchemaTooNew,
    OSError,
    TimeoutError,
)

#: Finished jobs are counted into ``job_totals`` by the statement that finishes them (a row
#: per shard and status, so instances do not queue on one counter row); ``count_by_status``
#: then never counts the ever-growing finished part of the jobs table.
#: ``{sign}`` is empty for jobs that just finished, ``-`` for finished jobs that leave (retry
#: and purge); ``{source}`` is a CTE returning their ``status`` as it was finished.
TALLY = (
    "tally AS (INSERT INTO job_totals (shard, status, n) SELECT {shard}, status, {sign}count(*)"
    f" FROM {{source}} WHERE {sql.FINAL} GROUP BY status"
    " ON CONFLICT (shard, status) DO UPDATE SET n = job_totals.n + excluded.n)"
)
TOTAL_SHARDS = 16
#: Purge deletes in batches of this many rows, each its own short transaction.
PURGE_BATCH = 5000


#: asyncpg hands ``jsonb`` over as text and ``timestamptz`` as aware datetimes.
ROWS = sql.JobRows()
COLUMNS = sql.job_columns("json_build_object")
#: The first ``to`` recipient in lower case, as the ``jobs_recipient`` index holds it.
RECIPIENT = "lower(message -> 'to' ->> 0)"


# The statements of the hot paths, whose plans tests/test_postgres.py checks on a grown table.


def _claim(oldest: bool) -> str:
    due = f"FROM jobs WHERE channel = $1 AND {sql.WAITING} AND run_at <= now()"
    lock = " FOR UPDATE SKIP LOCKED"
    chosen = sql.claim_order(due, oldest="$5" if oldest else None, limit="$4", lock=lock)
    # The rows are found by their primary key alone: ``chosen`` locked them while they were
    # waiting, so nobody else changed them since. A status condition here let a planner on
    # stale statistics read the whole waiting index beside the key (a BitmapAnd).
    return (
        "UPDATE jobs SET status = 'sending', attempts = attempts + 1, lease_owner = $2,"
        " lease_until = now() + make_interval(secs => $3), updated_at = now()"
        f" WHERE id = ANY(ARRAY({chosen}))"
        f" RETURNING {sql.CLAIMED_COLUMNS}"
    )


#: ``(ids, channels, messages as JSON, keys, run_ats, priority ranks, collapse values,
#: callback URLs, NOTIFY channel, poll interval)``: the jobs whose keys are new, and one
#: NOTIFY (sent when the statement's transaction commits) when any of them falls due before
#: the dispatchers' next poll would find it. A batch due later wakes nobody: during a bulk
#: send scheduled ahead, every batch woke every lane of every instance to claim nothing.
ENQUEUE = (
    "WITH stored AS (INSERT INTO jobs (id, channel, status, message, idempotency_key,"
    " created_at, updated_at, run_at, priority, collapse, callback_url)"
    " SELECT j.id, j.channel, 'queued', j.message::jsonb, j.key, now(), now(),"
    " coalesce(j.run_at, now()), j.priority, j.collapse, j.callback_url"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],"
    " $6::smallint[], $7::text[], $8::text[])"
    " AS j(id, channel, message, key, run_at, priority, collapse, callback_url)"
    " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id, idempotency_key, run_at),"
    " woken AS (SELECT pg_notify($9, '') FROM"
    " (SELECT FROM stored WHERE run_at <= now() + make_interval(secs => $10) LIMIT 1) AS soon)"
    " SELECT id, idempotency_key, run_at <= now() + make_interval(secs => $10) AS soon"
    " FROM stored LEFT JOIN woken ON true"
)
#: ``(channel, owner, lease seconds, limit[, oldest])``, by whether ``oldest`` is above 0.
CLAIM = {oldest: _claim(oldest) for oldest in (False, True)}
#: ``(ids, statuses, errors, run_ats, results as JSON, owner, shard)``, one round trip.
RECORD = (
    "WITH done AS (UPDATE jobs SET status = o.status, last_error = o.last_error,"
    " run_at = coalesce(o.run_at, jobs.run_at),"
    " results = coalesce(o.results::jsonb, jobs.results), updated_at = now(),"
    " lease_owner = NULL, lease_until = NULL"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[])"
    " AS o(id, status, last_error, run_at, results)"
    " WHERE jobs.id = o.id AND jobs.status = 'sending' AND jobs.lease_owner = $6"
    " RETURNING jobs.id, jobs.status, jobs.channel, o.results), "
    # The provider ids of delivered recipients, for receipts to find their job
    # (email bounces find it by Message-ID).
    "refs AS (INSERT INTO provider_refs (ref, job_id, recipient)"
    " SELECT d.value, done.id, d.key FROM done"
    " CROSS JOIN LATERAL jsonb_each_text(done.results::jsonb -> 'delivered') AS d"
    " WHERE done.channel <> 'email' AND d.value IS NOT NULL ON CONFLICT DO NOTHING), "
    + TALLY.format(shard="$7::smallint", source="done", sign="")
    + " SELECT id FROM done"
)
#: The first entry of each priority's range of the due index, the earliest of them.
NEXT_DUE = "SELECT least({})".format(
    ", ".join(
        f"(SELECT min(run_at) FROM jobs WHERE channel = $1 AND {sql.WAITING}"
        f" AND priority = {p.rank})"
        for p in Priority
    )
)
GET = f"SELECT {COLUMNS} FROM jobs WHERE id = $1"
COUNT_BY_STATUS = (
    f"SELECT status, count(*) AS n FROM jobs WHERE {sql.WAITING} GROUP BY status"
    " UNION ALL SELECT 'sending', count(*) FROM jobs WHERE status = 'sending'"
    " UNION ALL SELECT status, sum(n) FROM job_totals GROUP BY status"
)
#: One batch: ``(cutoff, batch size, shard)``; the count of jobs it deleted. Oldest first,
#: in the finished index's order: a scan of the table from its start would step over the
#: rows earlier batches left dead, more with every batch.
PURGE = (
    "WITH purged AS (DELETE FROM jobs WHERE id = ANY(ARRAY("
    f"SELECT id FROM jobs WHERE {sql.FINAL} AND updated_at < $1"
    " ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED)) RETURNING id, status),"
    " events_gone AS (DELETE FROM events WHERE job_id IN (SELECT id FROM purged)),"
    " refs_gone AS (DELETE FROM provider_refs"
    " WHERE job_id IN (SELECT id FROM purged)), "
    + TALLY.format(shard="$3::smallint", source="purged", sign="-")
    + " SELECT count(*) FROM purged"
)


def _count(status: str) -> int:
    """Rows touched, from a command tag such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])


def asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` and ``postgres://...`` as asyncpg takes them."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


def connect_options(settings: Settings) -> dict[str, Any]:
    """asyncpg connection arguments for ``settings``.

    PgBouncer in transaction mode keeps no prepared statements and passes no startup settings,
    so there the client-side ``command_timeout`` is the only timeout.
    """
    timeout = settings.database_statement_timeout
    options: dict[str, Any] = {
        "dsn": asyncpg_dsn(settings.database_url),
        "timeout": timeout,
        "command_timeout": timeout,
        "server_settings": {"application_name": "notifier"},
    }
    if settings.database_pgbouncer:
        options["statement_cache_size"] = 0
    else:
        options["server_settings"]["statement_timeout"] = str(int(timeout * 1000))
    return options


async def _keep_session(_conn: AnyConnection) -> None:
    """Pool reset hook: the store keeps no session state (no LISTEN, no session locks,
    no SET), so the default ``RESET ALL; UNLISTEN *; ...`` round trip per use is skipped."""


class PostgresStore(Store):
    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self._timeout = self.settings.database_statement_timeout
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._listener: Listener | None = None
        self._owner: str | None = None
        self._heart: Heartbeat | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._shard = random.randrange(TOTAL_SHARDS)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(settings)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        options = connect_options(self.settings)
        try:
            self._pool = await asyncpg.create_pool(
                min_size=1,
                max_size=self.settings.database_pool_size,
                max_inactive_connection_lifetime=60,
                reset=_keep_session,
                **options,
            )
            async with self._connection() as conn:
                await schema.migrate(conn)
                await schema.warn_about_upkeep(conn)
        except DATABASE_ERRORS as exc:
            await self.close()
            raise StoreUnavailable(f"postgresql: cannot open: {exc}") from exc
        except StoreUnavailable:
            await self.close()
            raise
        if not self.settings.database_pgbouncer:
            self._listener = Listener(
                lambda: asyncpg.connect(**options),
                schema.WORK_CHANNEL,
                self._notify_work,
                check_interval=self.settings.heartbeat_interval * 5,
                errors=DATABASE_ERRORS,
            )
            self._listener.start()

    async def close(self) -> None:
        if self._liveness is not None:
            self._liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._liveness
            self._liveness = None
        if self._heart is not None:
            # Before retiring: a late beat would put the instance back in the table.
            await self._heart.stop(self._timeout + self.settings.heartbeat_interval)
            self._heart = None
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._owner is not None and self._pool is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._retire(self._owner)
        self._owner = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except TimeoutError:
                pool.terminate()

    @asynccontextmanager
    async def _connection(self, *, transaction: bool = False) -> AsyncIterator[AnyConnection]:
        """A pooled connection (in a transaction if asked), database errors translated.

        A session that found the database read-only (a standby after a failover, or
        ``default_transaction_read_only`` set) stays so until it reconnects: it is closed,
        not pooled, so writes resume as soon as the database takes them again."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                try:
                    if transaction:
                        async with conn.transaction():
                            yield conn
                    else:
                        yield conn
                except asyncpg.ReadOnlySQLTransactionError:
                    conn.terminate()
                    raise
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(f"postgresql: {exc}") from exc

    async def ping(self) -> None:
        # Taking a transaction id commits a WAL record: a standby or a full disk refuses it
        # where it would still answer a plain read. A read-only transaction hands one out,
        # but refuses the (empty) write.
        async with self._connection() as conn:
            await conn.fetchval(
                "WITH touch AS (UPDATE instances SET heartbeat_at = heartbeat_at WHERE false)"
                " SELECT txid_current()"
            )

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """A session advisory lock for the block, on a connection of its own: one instance at
        a time does ``name``, the others skip it. What the block raises is its own (a mailbox
        error is not a database error). Behind PgBouncer in transaction mode a session lock
        does not hold across statements, so there every instance may do ``name``."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        key = f"notifier:{name}"
        try:
            conn = await self._pool.acquire(timeout=self._timeout)
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(f"postgresql: {exc}") from exc
        try:
            try:
                locked = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key)
            except DATABASE_ERRORS as exc:
                raise StoreUnavailable(f"postgresql: {exc}") from exc
            try:
                yield bool(locked)
            finally:
                if locked:
                    with contextlib.suppress(*DATABASE_ERRORS):
                        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
        finally:
            await self._pool.release(conn)

    # -- intake ------------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[Enqueued]:
        # The first job of each idempotency key, and every job without one.
        batch: dict[tuple[str, str], NewJob] = {}
        for job in jobs:
            key = job.idempotency_key
            batch.setdefault(("id", job.message.id) if key is None else ("key", key), job)
        rows = list(batch.values())
        # Without collapsing, the one statement is the whole transaction: one round trip.
        collapsing = any(job.collapse is not None for job in rows)
        async with self._connection(transaction=collapsing) as conn:
            inserted = await conn.fetch(
                ENQUEUE,
                [job.message.id for job in rows],
                [job.message.channel for job in rows],
                [pydantic_core.to_json(job.message.to_dict()).decode() for job in rows],
                [job.idempotency_key for job in rows],
                [job.run_at for job in rows],
                [job.priority.rank for job in rows],
                [job.collapse for job in rows],
                [job.callback_url for job in rows],
                schema.WORK_CHANNEL,
                self.settings.poll_interval,
            )
            stored = {row["idempotency_key"]: row["id"] for row in inserted}
            conflicts = [
                job.idempotency_key
                for job in rows
                if job.idempotency_key is not None and job.idempotency_key not in stored
            ]
            if conflicts:
                # A statement after the INSERT: its snapshot sees rows that concurrent
                # transactions committed while the INSERT waited on their keys.
                found = await conn.fetch(
                    "SELECT idempotency_key, id FROM jobs WHERE idempotency_key = ANY($1)",
                    conflicts,
                )
                stored.update((row["idempotency_key"], row["id"]) for row in found)
            new_ids = {row["id"] for row in inserted}
            await self._collapse(conn, [job for job in rows if job.message.id in new_ids])
        if any(row["soon"] for row in inserted):
            self._notify_work()
        return [self._answer(job, stored) for job in jobs]

    async def _collapse(self, conn: AnyConnection, jobs: Sequence[NewJob]) -> None:
        """The newest job of each collapse value supersedes the waiting others, in the
        transaction that stores it. Transactions take turns per value (an advisory lock, in
        one order), so of two sent at once the later always sees the earlier."""
        collapsing = [job for job in jobs if job.collapse is not None]
        if not collapsing:
            return
        values = sorted({job.collapse for job in collapsing if job.collapse is not None})
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(c)) FROM unnest($1::text[]) AS c ORDER BY c",
            values,
        )
        await conn.execute(
            "WITH newest AS (SELECT DISTINCT ON (c) id, c"
            " FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS n(id, c, i)"
            " ORDER BY c, i DESC),"
            " superseded AS (UPDATE jobs SET status = 'cancelled', superseded_by = newest.id,"
            " updated_at = now(), lease_owner = NULL, lease_until = NULL FROM newest"
            f" WHERE jobs.collapse = newest.c AND jobs.{sql.WAITING} AND jobs.id <> newest.id"
            " RETURNING jobs.status), "
            + TALLY.format(shard="$3::smallint", source="superseded", sign="")
            + " SELECT 1",
            [job.message.id for job in collapsing],
            [job.collapse for job in collapsing],
            self._shard,
        )

    @staticmethod
    def _answer(job: NewJob, stored: dict[str, str]) -> Enqueued:
        if job.idempotency_key is None:
            return Enqueued(job.message.id)
        job_id = stored[job.idempotency_key]
        return Enqueued(job_id, duplicate=job_id != job.message.id)

    # -- delivery ----------------------------------------------------------------------------

    async def claim(
        self, channel: str, *, owner: str, limit: int, lease_seconds: float, oldest: int = 0
    ) -> list[Job]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                CLAIM[oldest > 0],
                channel,
                owner,
                lease_seconds,
                limit,
                *([oldest] if oldest else []),
            )
        return sql.in_claim_order(map(ROWS.job, rows))

    async def record(self, owner: str, outcomes: Sequence[Outcome]) -> list[bool]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                RECORD,
                [o.job_id for o in outcomes],
                [o.status.value for o in outcomes],
                [o.last_error for o in outcomes],
                [o.run_at for o in outcomes],
                [json.dumps(o.results) if o.results else None for o in outcomes],
                owner,
                self._shard,
            )
        applied = {row["id"] for row in rows}
        unsent = [
            o for o in outcomes if o.status is not JobStatus.DELIVERED and o.job_id in applied
        ]
        if unsent:
            async with self._connection() as conn:
                await conn.execute(
                    "DELETE FROM recipient_sends s USING jsonb_each($1::jsonb) AS o"
                    " WHERE s.job_id = o.key AND NOT (o.value ? s.recipient)",
                    json.dumps({o.job_id: o.results.get("delivered", {}) for o in unsent}),
                )
        if any(o.status is JobStatus.RETRYING for o in outcomes):
            self._notify_work()
        return [o.job_id in applied for o in outcomes]

    async def extend_leases(self, owner: str, job_ids: Sequence[str], lease_seconds: float) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE jobs SET lease_until = now() + make_interval(secs => $3)"
                " WHERE id = ANY($1) AND status = 'sending' AND lease_owner = $2",
                list(job_ids),
                owner,
                lease_seconds,
            )

    async def release(self, owner: str, job_ids: Sequence[str]) -> None:
        async with self._connection(transaction=True) as conn:
            count = await self._requeue(
                conn,
                "lease_owner = $2 AND id = ANY($3)",
                owner,
                list(job_ids),
                reason=sql.INTERRUPTED_BY_SHUTDOWN,
            )
        if count:
            self._notify_work()

    async def release_unheld(self, owner: str, channel: str, held: Collection[str]) -> int:
        async with self._connection(transaction=True) as conn:
            count = await self._requeue(
                conn,
                "lease_owner = $2 AND channel = $3 AND NOT id = ANY($4)",
                owner,
                channel,
                list(held),
                reason=sql.CLAIM_ANSWER_LOST,
            )
        if count:
            self._notify_work()
        return count

    @staticmethod
    async def _requeue(conn: AnyConnection, where: str, *params: Any, reason: str) -> int:
        """Put jobs in flight back in the queue, due now, and wake every instance."""
        count = _count(
            await conn.execute(
                "UPDATE jobs SET status = 'retrying', run_at = now(), updated_at = now(),"
                " lease_owner = NULL, lease_until = NULL, last_error = $1"
                f" WHERE status = 'sending' AND {where}",
                reason,
                *params,
            )
        )
        if count:
            await conn.execute("SELECT pg_notify($1, '')", schema.WORK_CHANNEL)
        return count

    # -- liveness ----------------------------------------------------------------------------

    async def recover(self, *, owner: str) -> int:
        """Start heartbeating for ``owner`` (once now, then from the heartbeat's thread) and
        reaping for everyone (once now, then every ``heartbeat_interval``); work of live
        instances is left alone."""
        self._owner = owner
        async with self._connection() as conn:
            await conn.fetchval(BEAT, owner)
        count = await self._reap()
        if self._heart is None:
            options = connect_options(self.settings)
            self._heart = Heartbeat(
                lambda: asyncpg.connect(**options),
                owner,
                interval=self.settings.heartbeat_interval,
                dead_after=self.settings.instance_dead_after,
                errors=DATABASE_ERRORS,
            )
            self._heart.start()
            self._liveness = asyncio.create_task(
                self._keep_alive(self._heart), name="postgres-liveness"
            )
        return count

    async def _keep_alive(self, heart: Heartbeat) -> None:
        """Reap every ``heartbeat_interval``. After an outage nobody could heartbeat through,
        every instance looks dead for a moment: reaping waits until the others had
        ``instance_dead_after`` to beat again (as long as this instance's heartbeat has been
        getting through), so none is reaped for the outage."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            if heart.reachable_for() < self.settings.instance_dead_after:
                continue
            try:
                await self._reap()
            except StoreUnavailable as exc:
                log.debug("reaping: store unavailable: %s", exc)

    async def _reap(self) -> int:
        """Requeue the work of dead instances and of run-out leases; one reaper at a time."""
        async with self._connection(transaction=True) as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", schema.REAPER_LOCK):
                return 0
            dead_after = self.settings.instance_dead_after
            count = await self._requeue(
                conn,
                "(lease_until < now() OR lease_owner IN (SELECT owner FROM instances"
                " WHERE heartbeat_at < now() - make_interval(secs => $2)))",
                dead_after,
                reason="delivery interrupted: its instance stopped or its lease ran out;"
                " it will be tried again",
            )
            await conn.execute(
                "UPDATE events SET lease_owner = NULL, lease_until = NULL"
                " WHERE state = 'pending' AND lease_owner IN (SELECT owner FROM instances"
                " WHERE heartbeat_at < now() - make_interval(secs => $1))",
                dead_after,
            )
            await conn.execute(
                "DELETE FROM instances WHERE heartbeat_at < now() - make_interval(secs => $1)",
                dead_after,
            )
        if count:
            log.warning("requeued %d deliveries left in flight by stopped instances", count)
            self._notify_work()
        return count

    async def _retire(self, owner: str) -> None:
        """At close: give back whatever ``owner`` still holds and leave the instances table."""
        async with self._connection(transaction=True) as conn:
            await self._requeue(
                conn,
                "lease_owner = $2",
                owner,
                reason=sql.INTERRUPTED_BY_SHUTDOWN,
            )
            await conn.execute("DELETE FROM instances WHERE owner = $1", owner)

    # -- queries -----------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(GET, job_id)
        return ROWS.job(row) if row is not None else None

    async def cancel(self, job_id: str) -> Job | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "WITH cancelled AS (UPDATE jobs SET status = 'cancelled', updated_at = now(),"
                f" lease_owner = NULL, lease_until = NULL WHERE id = $1 AND NOT {sql.FINAL}"
                f" RETURNING {COLUMNS}), "
                + TALLY.format(shard="$2::smallint", source="cancelled", sign="")
                + " SELECT * FROM cancelled",
                job_id,
                self._shard,
            )
            if row is None:
                row = await conn.fetchrow(GET, job_id)
        return ROWS.job(row) if row is not None else None

    async def next_due(self, channel: str) -> datetime | None:
        async with self._connection() as conn:
            due: datetime | None = await conn.fetchval(NEXT_DUE, channel)
        return due

    async def count_by_status(self) -> dict[JobStatus, int]:
        """Work in progress counted on the partial indexes, finished work from job_totals."""
        async with self._connection() as conn:
            rows = await conn.fetch(COUNT_BY_STATUS)
        return sql.status_counts(rows)

    async def count_waiting(self) -> dict[tuple[str, Priority], int]:
        async with self._connection() as conn:
            return sql.waiting_counts(await conn.fetch(sql.COUNT_WAITING))

    # -- administration ----------------------------------------------------------------------

    async def list_jobs(
        self, *, status: JobStatus | None, since: datetime | None, limit: int
    ) -> list[Job]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM jobs WHERE ($1::text IS NULL OR status = $1)"
                " AND updated_at >= coalesce($2::timestamptz, '-infinity')"
                " ORDER BY updated_at DESC LIMIT $3",
                status.value if status else None,
                since,
                limit,
            )
        return [ROWS.job(row) for row in rows]

    async def retry(self, *, job_ids: Sequence[str] | None, since: datetime | None) -> list[str]:
        async with self._connection(transaction=True) as conn:
            rows = await conn.fetch(
                "WITH requeued AS (UPDATE jobs SET status = 'queued', attempts = 0,"
                " run_at = now(), updated_at = now() WHERE status = 'failed'"
                " AND ($1::text[] IS NULL OR id = ANY($1))"
                " AND updated_at >= coalesce($2::timestamptz, '-infinity')"
                " RETURNING id, 'failed'::text AS status), "
                + TALLY.format(shard="$3::smallint", source="requeued", sign="-")
                + " SELECT id FROM requeued",
                None if job_ids is None else list(job_ids),
                since,
                self._shard,
            )
            if rows:
                await conn.execute("SELECT pg_notify($1, '')", schema.WORK_CHANNEL)
        if rows:
            self._notify_work()
        return [row["id"] for row in rows]

    async def purge(self, *, before: datetime) -> int:
        """In batches that skip rows other instances are purging: one huge DELETE would run
        into the statement timeout and hold its locks for as long."""
        total = 0
        while True:
            async with self._connection() as conn:
                deleted: int = await conn.fetchval(
                    PURGE,
                    before,
                    PURGE_BATCH,
                    self._shard,
                )
            total += deleted
            if deleted < PURGE_BATCH:
                break
        async with self._connection() as conn:
            await conn.execute("DELETE FROM recipient_sends WHERE sent_at < $1", before)
            await conn.execute("DELETE FROM recipient_holds WHERE until < now()")
            await conn.execute("DELETE FROM receipt_orphans WHERE created_at < $1", before)
        return total

    # -- traffic control ---------------------------------------------------------------------

    async def pace(
        self, owner: str, jobs: Sequence[Job], limits: Sequence[RecipientLimit]
    ) -> dict[str, datetime]:
        windows = json.dumps([[limit.count, limit.seconds] for limit in limits])
        deferred: dict[str, datetime] = {}
        async with self._connection(transaction=True) as conn:
            numbers = sorted({n for job in jobs for n in job.pending_message().pending_to})
            # Instances pacing the same numbers take turns (in one order: no deadlock).
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(n)) FROM unnest($1::text[]) AS n ORDER BY n",
                numbers,
            )
            for job in jobs:
                recipients = list(job.pending_message().pending_to)
                until: datetime | None = await conn.fetchval(
                    "SELECT max(t) FROM ("
                    " SELECT until AS t FROM recipient_holds"
                    "  WHERE recipient = ANY($1) AND until > now()"
                    " UNION ALL"
                    " SELECT min(s.sent_at) + make_interval(secs => (w.value ->> 1)::float8)"
                    "  FROM unnest($1::text[]) AS r(n) CROSS JOIN jsonb_array_elements($2::jsonb)"
                    "  WITH ORDINALITY AS w(value, i)"
                    "  JOIN recipient_sends AS s ON s.recipient = r.n AND s.sent_at > now()"
                    "   - make_interval(secs => (w.value ->> 1)::float8)"
                    "  GROUP BY r.n, w.i, w.value HAVING count(*) >= (w.value ->> 0)::int) AS b(t)",
                    recipients,
                    windows,
                )
                if until is not None:
                    deferred[job.id] = until
                    continue
                await conn.execute(
                    "INSERT INTO recipient_sends (recipient, sent_at, job_id)"
                    " SELECT n, now(), $2 FROM unnest($1::text[]) AS n",
                    recipients,
                    job.id,
                )
            if deferred:
                await conn.execute(
                    "UPDATE jobs SET status = CASE WHEN attempts > 1 THEN 'retrying'"
                    " ELSE 'queued' END, attempts = attempts - 1, run_at = d.run_at,"
                    " lease_owner = NULL, lease_until = NULL"
                    " FROM unnest($1::text[], $2::timestamptz[]) AS d(id, run_at)"
                    " WHERE jobs.id = d.id AND jobs.status = 'sending' AND jobs.lease_owner = $3",
                    list(deferred),
                    list(deferred.values()),
                    owner,
                )
        return deferred

    async def hold_recipients(self, holds: Mapping[str, datetime]) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO recipient_holds (recipient, until)"
                " SELECT * FROM unnest($1::text[], $2::timestamptz[])"
                " ON CONFLICT (recipient) DO UPDATE"
                " SET until = greatest(recipient_holds.until, excluded.until)",
                list(holds),
                list(holds.values()),
            )

    # -- suppression -------------------------------------------------------------------------

    async def suppressed(self, addresses: Collection[str]) -> dict[str, str]:
        if not addresses:
            return {}
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT address, reason FROM suppressions WHERE address = ANY($1)",
                sorted(addresses),
            )
        return {row["address"]: row["reason"] for row in rows}

    async def suppress(self, address: str, reason: str) -> None:
        async with self._connection() as conn:
            await self._suppress(conn, address, reason)

    @staticmethod
    async def _suppress(conn: AnyConnection, address: str, reason: str) -> None:
        await conn.execute(
            "INSERT INTO suppressions (address, reason) VALUES ($1, $2)"
            " ON CONFLICT (address) DO NOTHING",
            address,
            reason,
        )

    async def unsuppress(self, address: str) -> bool:
        async with self._connection() as conn:
            return (
                _count(await conn.execute("DELETE FROM suppressions WHERE address = $1", address))
                > 0
            )

    async def list_suppressions(self) -> list[Suppression]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT address, reason, created_at FROM suppressions ORDER BY created_at, address"
            )
        return [Suppression(row["address"], row["reason"], row["created_at"]) for row in rows]

    # -- callbacks and receipts --------------------------------------------------------------

    async def claim_events(self, *, owner: str, limit: int, lease_seconds: float) -> list[Event]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "UPDATE events SET attempts = attempts + 1, lease_owner = $1,"
                " lease_until = now() + make_interval(secs => $2)"
                " WHERE id = ANY(ARRAY(SELECT id FROM events WHERE state = 'pending'"
                " AND run_at <= now() AND (lease_until IS NULL OR lease_until < now())"
                " ORDER BY run_at LIMIT $3 FOR UPDATE SKIP LOCKED))"
                " RETURNING id, job_id, type, url, created_at, attempts",
                owner,
                lease_seconds,
                limit,
            )
            if not rows:
                return []
            jobs = await conn.fetch(
                f"SELECT {COLUMNS} FROM jobs WHERE id = ANY($1)", [row["job_id"] for row in rows]
            )
        return sql.events(rows, {job.id: job for job in map(ROWS.job, jobs)}, lambda at: at)

    async def record_events(self, owner: str, outcomes: Sequence[EventOutcome]) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE events SET state = o.state, last_error = o.last_error,"
                " run_at = coalesce(o.run_at, events.run_at), lease_owner = NULL,"
                " lease_until = NULL"
                " FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])"
                " AS o(id, state, last_error, run_at)"
                " WHERE events.id = o.id AND events.lease_owner = $5",
                [o.event_id for o in outcomes],
                [o.state.value for o in outcomes],
                [o.last_error for o in outcomes],
                [o.run_at for o in outcomes],
                owner,
            )

    async def record_receipts(self, reports: Sequence[ReceiptReport]) -> list[bool]:
        return [await self._record_receipt(report) for report in reports]

    async def _provider_ref(self, report: ReceiptReport) -> asyncpg.Record | None:
        """The delivery a provider id names, or None, and then the receipt is kept for it.

        Under the id's lock, which the delivery's record takes too before it adopts what was
        kept, and in a transaction of its own, so that it never waits on the job's row while
        holding the lock."""
        async with self._connection(transaction=True) as conn:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('notifier:ref:' || $1))", report.reference
            )
            row: asyncpg.Record | None = await conn.fetchrow(
                "SELECT p.job_id, p.recipient, j.channel, j.receipts FROM provider_refs p"
                " JOIN jobs j ON j.id = p.job_id WHERE p.ref = $1",
                report.reference,
            )
            if row is None:
                await conn.execute(
                    "INSERT INTO receipt_orphans (ref, receipt) VALUES ($1, $2::jsonb)",
                    report.reference,
                    json.dumps(sql.receipt_patch("", report)[""]),
                )
        return row

    async def _record_receipt(self, report: ReceiptReport) -> bool:
        if report.by == "provider_id":
            row = await self._provider_ref(report)
            if row is None:
                return False
            job_id, recipient = row["job_id"], row["recipient"]
        else:
            async with self._connection() as conn:
                row = await conn.fetchrow(
                    "SELECT channel, message, results, receipts FROM jobs WHERE id = $1",
                    report.reference,
                )
            if row is None:
                return False
            job_id = report.reference
            recipient = sql.match_recipient(
                sql.recipients_of(json.loads(row["message"]), json.loads(row["results"] or "{}")),
                report.recipient,
            )
            if recipient is None:
                return False
        known = json.loads(row["receipts"] or "{}")
        if sql.same_receipt(known.get(recipient), report):
            return True
        async with self._connection(transaction=True) as conn:
            await conn.execute(
                "UPDATE jobs SET receipts = coalesce(receipts, '{}') || $1::jsonb WHERE id = $2",
                json.dumps(sql.receipt_patch(recipient, report)),
                job_id,
            )
            if row["channel"] == "email" and sql.is_hard_bounce(report):
                await self._suppress(conn, bare_address(recipient), report.reason or "hard bounce")
        return True

    # -- dashboard ---------------------------------------------------------------------------

    async def search_jobs(self, search: JobSearch) -> list[Job]:
        params: list[Any] = []

        def param(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        where = sql.search_where(search, param, recipient=RECIPIENT, moment=lambda at: at)
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM jobs WHERE {where}"
                f" ORDER BY created_at DESC LIMIT {param(search.limit)}",
                *params,
            )
        return [ROWS.job(row) for row in rows]

    async def recent_failures(self, limit: int) -> list[Job]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM jobs WHERE {sql.FAILING} ORDER BY updated_at DESC LIMIT $1",
                limit,
            )
        return [ROWS.job(row) for row in rows]

    async def outcomes_per_minute(self, since: datetime) -> list[MinuteOutcomes]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                sql.OUTCOMES_PER_MINUTE.format(
                    minute="date_trunc('minute', updated_at)", since="$1"
                ),
                since,
            )
        return sql.minute_outcomes(rows, lambda minute: minute)

    async def callback_backlog(self) -> CallbackBacklog:
        async with self._connection() as conn:
            row = await conn.fetchrow(sql.CALLBACK_BACKLOG)
        assert row is not None
        return CallbackBacklog(row[0], row[1])
