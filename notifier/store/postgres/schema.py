"""Versioned schema migrations, applied in one transaction under an advisory lock.

Several instances may start at once against a fresh database: the transaction-level
advisory lock lets one of them migrate while the others wait and then find nothing to do.
DDL is transactional in PostgreSQL, so a failed migration leaves no half-built schema.
The lock is transaction-scoped (not session-scoped) so this also works through PgBouncer in
transaction mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    #: A plain connection (``notifier migrate``) or one from the store's pool.
    AnyConnection: TypeAlias = (
        asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    )

log = logging.getLogger("notifier.store.postgres")

#: pg_advisory_xact_lock keys; arbitrary, but fixed for every notifier version.
MIGRATION_LOCK = 0x6E6F7469_6D696772  # "notimigr"
REAPER_LOCK = 0x6E6F7469_72656170  # "notireap"

#: The NOTIFY channel that wakes idle dispatchers of every instance.
WORK_CHANNEL = "notifier_work"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


#: History: a migration is never edited once released, nor built from today's constants. The
#: partial indexes' conditions must still match ``notifier.store.sql.WAITING`` and ``FINAL``
#: (tests/test_postgres.py checks): a change to a status group comes with a migration here.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "jobs and instances",
        """
        CREATE TABLE jobs (
            id text PRIMARY KEY,
            channel text NOT NULL,
            status text NOT NULL,
            message jsonb NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            last_error text,
            results jsonb,
            idempotency_key text UNIQUE,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            run_at timestamptz NOT NULL,
            lease_owner text,
            lease_until timestamptz
        );
        -- Claims read only this small index of waiting work, in the order they take it.
        CREATE INDEX jobs_due ON jobs (channel, run_at, id)
            WHERE status IN ('queued', 'retrying');
        CREATE INDEX jobs_leased ON jobs (lease_owner, lease_until) WHERE status = 'sending';
        CREATE INDEX jobs_finished ON jobs (updated_at)
            WHERE status IN ('delivered', 'failed', 'cancelled');
        -- Every job is updated two or three times and then kept: vacuum and analyze after a
        -- small fraction has changed, not the default 20%, so the due index stays small and
        -- the planner's statistics stay fresh on a large table.
        ALTER TABLE jobs SET (
            autovacuum_vacuum_scale_factor = 0.01,
            autovacuum_vacuum_threshold = 1000,
            autovacuum_vacuum_insert_scale_factor = 0.05,
            autovacuum_analyze_scale_factor = 0.02,
            autovacuum_analyze_threshold = 1000,
            autovacuum_vacuum_cost_delay = 1
        );

        -- Finished jobs per status, added to by the statement that finishes them; spread
        -- over a few shard rows so that instances do not wait on one counter row.
        CREATE TABLE job_totals (
            shard smallint NOT NULL,
            status text NOT NULL,
            n bigint NOT NULL,
            PRIMARY KEY (shard, status)
        );

        CREATE TABLE instances (
            owner text PRIMARY KEY,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now()
        );
        -- A few rows, each rewritten every couple of seconds.
        ALTER TABLE instances SET (
            autovacuum_vacuum_scale_factor = 0,
            autovacuum_vacuum_threshold = 200,
            fillfactor = 50
        );
        """,
    ),
    Migration(
        2,
        "priorities, collapsing, callbacks, receipts, suppression, pacing",
        """
        ALTER TABLE jobs
            ADD COLUMN priority smallint NOT NULL DEFAULT 1,
            ADD COLUMN collapse text,
            ADD COLUMN superseded_by text,
            ADD COLUMN callback_url text,
            ADD COLUMN receipts jsonb;
        -- Claims in priority order, then by due time, from waiting work only; the old index
        -- still serves next_due and the longest-waiting share of each claim.
        CREATE INDEX jobs_due_by_priority ON jobs (channel, priority, run_at, id)
            WHERE status IN ('queued', 'retrying');
        CREATE INDEX jobs_collapse ON jobs (collapse)
            WHERE status IN ('queued', 'retrying') AND collapse IS NOT NULL;

        -- Callback events, written by the triggers below in the transaction that causes them.
        CREATE TABLE events (
            id text PRIMARY KEY DEFAULT md5(random()::text || clock_timestamp()::text),
            job_id text NOT NULL,
            type text NOT NULL,
            url text NOT NULL,
            state text NOT NULL DEFAULT 'pending',
            attempts integer NOT NULL DEFAULT 0,
            last_error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            run_at timestamptz NOT NULL DEFAULT now(),
            lease_owner text,
            lease_until timestamptz
        );
        CREATE INDEX events_due ON events (run_at) WHERE state = 'pending';
        CREATE INDEX events_job ON events (job_id, created_at);
        CREATE UNIQUE INDEX events_one_final ON events (job_id) WHERE type = 'job.final';

        -- Provider message ids of delivered recipients, for receipts to find their job.
        CREATE TABLE provider_refs (
            ref text PRIMARY KEY,
            job_id text NOT NULL,
            recipient text NOT NULL
        );
        CREATE INDEX provider_refs_job ON provider_refs (job_id);
        -- Receipts that came before the delivery carrying their id was recorded.
        CREATE TABLE receipt_orphans (
            ref text NOT NULL,
            receipt jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX receipt_orphans_ref ON receipt_orphans (ref);

        CREATE TABLE suppressions (
            address text PRIMARY KEY,
            reason text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );

        -- Sends counted by pacing: taken when a job is admitted, given back if its send fails.
        CREATE TABLE recipient_sends (
            recipient text NOT NULL,
            sent_at timestamptz NOT NULL,
            job_id text NOT NULL
        );
        CREATE INDEX recipient_sends_by ON recipient_sends (recipient, sent_at);
        CREATE INDEX recipient_sends_job ON recipient_sends (job_id);
        CREATE TABLE recipient_holds (recipient text PRIMARY KEY, until timestamptz NOT NULL);

        CREATE FUNCTION notifier_final_event() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO events (job_id, type, url)
                VALUES (NEW.id, 'job.final', NEW.callback_url) ON CONFLICT DO NOTHING;
            RETURN NULL;
        END $$;
        CREATE TRIGGER jobs_final_event AFTER UPDATE OF status ON jobs FOR EACH ROW
            WHEN (NEW.callback_url IS NOT NULL
                  AND NEW.status IN ('delivered', 'failed', 'cancelled')
                  AND NOT OLD.status IN ('delivered', 'failed', 'cancelled'))
            EXECUTE FUNCTION notifier_final_event();

        CREATE FUNCTION notifier_receipt_event() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO events (job_id, type, url)
                VALUES (NEW.id, 'job.receipt', NEW.callback_url);
            RETURN NULL;
        END $$;
        CREATE TRIGGER jobs_receipt_event AFTER UPDATE OF receipts ON jobs FOR EACH ROW
            WHEN (NEW.callback_url IS NOT NULL AND NEW.receipts IS DISTINCT FROM OLD.receipts)
            EXECUTE FUNCTION notifier_receipt_event();

        CREATE FUNCTION notifier_adopt_orphans() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE found jsonb;
        BEGIN
            -- Receipts that find no id take the same lock before they keep themselves.
            PERFORM pg_advisory_xact_lock(hashtext('notifier:ref:' || NEW.ref));
            WITH adopted AS (DELETE FROM receipt_orphans WHERE ref = NEW.ref
                             RETURNING receipt, created_at)
            SELECT receipt INTO found FROM adopted ORDER BY created_at DESC LIMIT 1;
            IF found IS NOT NULL THEN
                UPDATE jobs
                SET receipts = coalesce(receipts, '{}') || jsonb_build_object(NEW.recipient, found)
                WHERE id = NEW.job_id;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER provider_refs_orphans AFTER INSERT ON provider_refs FOR EACH ROW
            EXECUTE FUNCTION notifier_adopt_orphans();
        """,
    ),
    Migration(
        3,
        "waiting work counted on its index",
        """
        -- count_by_status counts waiting jobs by status from the due index alone (an
        -- index-only scan), never from the table: the index carries the status.
        CREATE INDEX jobs_due_counted ON jobs (channel, run_at, id) INCLUDE (status)
            WHERE status IN ('queued', 'retrying');
        DROP INDEX jobs_due;
        ALTER INDEX jobs_due_counted RENAME TO jobs_due;
        """,
    ),
    Migration(
        4,
        "dashboard searches",
        """
        -- Searches by time and by recipient (the first one, in lower case), and the failed
        -- and failing jobs alone, which are few.
        CREATE INDEX jobs_created ON jobs (created_at);
        CREATE INDEX jobs_recipient ON jobs ((lower(message -> 'to' ->> 0)));
        CREATE INDEX jobs_failing ON jobs (updated_at) WHERE status IN ('retrying', 'failed');
        """,
    ),
    Migration(
        5,
        "one index of waiting work",
        """
        -- Claims read each priority's range of it in due order, next_due each range's first
        -- entry, and counts the index alone (it carries the status). With two indexes that
        -- both matched a claim, the planner on statistics older than the backlog walked
        -- (channel, run_at) for every priority, past all the waiting jobs of the others;
        -- and every insert paid for both.
        CREATE INDEX jobs_due_one ON jobs (channel, priority, run_at, id) INCLUDE (status)
            WHERE status IN ('queued', 'retrying');
        DROP INDEX jobs_due;
        DROP INDEX jobs_due_by_priority;
        ALTER INDEX jobs_due_one RENAME TO jobs_due;
        """,
    ),
)

LATEST = MIGRATIONS[-1].version


class SchemaTooNew(Exception):
    """The database was migrated by a newer notifier; this one must not touch it."""


async def applied_versions(conn: AnyConnection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}


async def migrate(conn: AnyConnection) -> list[Migration]:
    """Apply the missing migrations; return them (empty when the schema is current)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = await applied_versions(conn)
        if done and max(done) > LATEST:
            raise SchemaTooNew(
                f"the database schema is at version {max(done)}, newer than this notifier"
                f" knows ({LATEST}); upgrade notifier"
            )
        pending = [m for m in MIGRATIONS if m.version not in done]
        for migration in pending:
            log.info("schema: applying migration %d (%s)", migration.version, migration.name)
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
    if pending:
        await conn.execute("ANALYZE jobs")
    return pending


async def pending_migrations(conn: AnyConnection) -> list[Migration]:
    done = await applied_versions(conn)
    return [m for m in MIGRATIONS if m.version not in done]


async def warn_about_upkeep(conn: AnyConnection) -> bool:
    """Log a warning when autovacuum cannot run; return whether it can.

    Without it the jobs table and its indexes bloat with dead rows and the planner's
    statistics go stale, which is how job queues on PostgreSQL slow to a crawl.
    """
    autovacuum = await conn.fetchval("SELECT current_setting('autovacuum') = 'on'")
    track_counts = await conn.fetchval("SELECT current_setting('track_counts') = 'on'")
    if autovacuum and track_counts:
        return True
    log.warning(
        "PostgreSQL autovacuum is off (autovacuum=%s, track_counts=%s): the jobs table will"
        " bloat and its statistics go stale; turn autovacuum on, or run VACUUM ANALYZE jobs"
        " regularly",
        "on" if autovacuum else "off",
        "on" if track_counts else "off",
    )
    return False
