"""The store contract, one suite for every backend: SQLite (a real file) and PostgreSQL.

Each verb and each state change, as ``notifier.store.base`` promises them. Leases that have
already run out are made with a negative lease, so no test waits on a clock.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from notifier.models import (
    FINAL_STATUSES,
    CallbackBacklog,
    CallbackState,
    Enqueued,
    EventOutcome,
    Job,
    JobSearch,
    JobStatus,
    Message,
    NewJob,
    Outcome,
    Priority,
    ReceiptReport,
    ReceiptState,
    utcnow,
)
from notifier.settings import RecipientLimit, Settings
from notifier.store import Store, open_store, sql
from notifier.store import sqlite as sqlite_module
from notifier.store.sqlite import SQLiteStore
from tests.support.grown import grow_sqlite
from tests.support.server import isolated_settings

LONG = 300.0
EXPIRED = -1.0


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("postgres-pgbouncer", marks=pytest.mark.postgres),
    ]
)
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """SQLite in a real file; PostgreSQL directly, and as configured behind PgBouncer."""
    if request.param == "sqlite":
        return isolated_settings(tmp_path, database_url=f"sqlite:///{tmp_path}/notifier.db")
    url: str = request.getfixturevalue("postgres_url")
    pgbouncer = request.param.endswith("pgbouncer")
    return isolated_settings(tmp_path, database_url=url, database_pgbouncer=pgbouncer)


@pytest.fixture
async def store(store_settings: Settings) -> AsyncIterator[Store]:
    opened = open_store(store_settings)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def new_job(
    channel: str = "sms", *, key: str | None = None, delay: float | None = None, **fields: Any
) -> NewJob:
    job_id = uuid.uuid4().hex
    fields.setdefault("to", ("+14155550101",))
    message = Message(id=job_id, channel=channel, text="hi", **fields)
    run_at = utcnow() + timedelta(seconds=delay) if delay is not None else None
    return NewJob(message=message, idempotency_key=key, run_at=run_at)


async def add(store: Store, *jobs: NewJob) -> list[str]:
    answers = await store.enqueue(jobs or [new_job()])
    return [answer.id for answer in answers]


async def claim(store: Store, owner: str = "me", *, limit: int = 10, lease: float = LONG) -> Job:
    """Claim exactly one job."""
    (job,) = await store.claim("sms", owner=owner, limit=limit, lease_seconds=lease)
    return job


async def status(store: Store, job_id: str) -> JobStatus:
    job = await store.get(job_id)
    assert job is not None
    return job.status


# -- enqueue -----------------------------------------------------------------------------------


async def test_enqueue_stores_a_queued_job_with_its_message(store: Store) -> None:
    job = new_job(
        "email",
        key="k-1",
        subject="Grüße",
        html="<p>hi</p>",
        cc=("a@example.com",),
        bcc=("b@example.com",),
        reply_to=("张三 <zhang.san@example.com>",),
        extra={"tag": "welcome"},
    )
    before = utcnow() - timedelta(seconds=1)
    assert await store.enqueue([job]) == [Enqueued(job.message.id)]
    stored = await store.get(job.message.id)
    assert stored is not None
    assert stored.message == job.message
    assert (stored.channel, stored.status, stored.attempts) == ("email", JobStatus.QUEUED, 0)
    assert stored.idempotency_key == "k-1"
    assert stored.last_error is None and stored.results == {}
    assert before <= stored.created_at <= stored.updated_at <= utcnow()
    assert stored.run_at <= utcnow()


async def test_enqueue_answers_each_job_in_order(store: Store) -> None:
    jobs = [new_job() for _ in range(5)]
    assert await store.enqueue(jobs) == [Enqueued(job.message.id) for job in jobs]
    assert await store.enqueue([]) == []
    assert (await store.count_by_status())[JobStatus.QUEUED] == 5


async def test_idempotency_key_repeated_within_one_batch(store: Store) -> None:
    first, again, other = new_job(key="k"), new_job(key="k"), new_job()
    answers = await store.enqueue([first, again, other])
    assert answers == [
        Enqueued(first.message.id),
        Enqueued(first.message.id, duplicate=True),
        Enqueued(other.message.id),
    ]
    assert await store.get(again.message.id) is None
    assert (await store.count_by_status())[JobStatus.QUEUED] == 2


async def test_idempotency_key_repeated_in_a_later_batch(store: Store) -> None:
    (first,) = await add(store, new_job(key="k"))
    later = [new_job(), new_job(key="k"), new_job(key="k")]
    answers = await store.enqueue(later)
    assert answers[1:] == [Enqueued(first, duplicate=True)] * 2
    assert not answers[0].duplicate
    assert (await store.count_by_status())[JobStatus.QUEUED] == 2


async def test_idempotency_holds_after_the_job_is_finished(store: Store) -> None:
    (first,) = await add(store, new_job(key="k"))
    await store.record("me", [Outcome((await claim(store)).id, JobStatus.DELIVERED)])
    assert await store.enqueue([new_job(key="k")]) == [Enqueued(first, duplicate=True)]


async def test_enqueue_wakes_listeners(store: Store) -> None:
    woken: list[bool] = []
    store.on_work(lambda: woken.append(True))
    await store.enqueue([new_job()])
    assert woken


async def test_jobs_survive_reopening(store: Store, store_settings: Settings) -> None:
    (job_id,) = await add(store)
    await store.close()
    reopened = open_store(store_settings)
    await reopened.open()
    try:
        assert await status(reopened, job_id) is JobStatus.QUEUED
    finally:
        await reopened.close()


async def test_a_store_is_built_from_its_settings_not_the_environment(
    store_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFIER_DATABASE_URL", f"sqlite:///{tmp_path}/elsewhere/other.db")
    monkeypatch.setenv("NOTIFIER_DATABASE_POOL_SIZE", "not a number")
    built = open_store(store_settings)
    await built.open()
    try:
        (job_id,) = await add(built)
        assert await status(built, job_id) is JobStatus.QUEUED
    finally:
        await built.close()
    assert not (tmp_path / "elsewhere").exists()


def test_an_unknown_scheme_is_named(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path).model_copy(update={"database_url": "mysql://db/x"})
    with pytest.raises(ValueError, match=r"NOTIFIER_DATABASE_URL: unknown scheme 'mysql'"):
        open_store(settings)


def test_every_status_is_waiting_in_flight_or_final_and_only_one() -> None:
    """The PostgreSQL store counts jobs by these groups: a status outside them would vanish."""
    groups = [sql.WAITING_STATUSES, {JobStatus.SENDING}, FINAL_STATUSES]
    assert sorted(s for group in groups for s in group) == sorted(JobStatus)


def test_every_job_field_is_a_column_read_back() -> None:
    """A field left out would read back as its default from either store, silently."""
    assert sorted(f.name for f in dataclasses.fields(Job)) == sorted(sql.JOB_COLUMNS)


# -- send_at and next_due ----------------------------------------------------------------------


async def test_send_at_in_the_future_is_not_claimed_until_due(store: Store) -> None:
    job = new_job(delay=3600)
    await add(store, job)
    assert await store.claim("sms", owner="me", limit=10, lease_seconds=LONG) == []
    assert await store.next_due("sms") == job.run_at


async def test_send_at_in_the_past_is_due_at_once(store: Store) -> None:
    (job_id,) = await add(store, new_job(delay=-60))
    assert (await claim(store)).id == job_id


async def test_next_due_is_the_earliest_waiting_job_of_the_channel(store: Store) -> None:
    assert await store.next_due("sms") is None
    early, late = new_job(delay=60), new_job(delay=120)
    await add(store, late, early, new_job("email", delay=1))
    assert await store.next_due("sms") == early.run_at
    await add(store, new_job(delay=-5))
    await claim(store)  # the due one is sending now: no longer waiting
    assert await store.next_due("sms") == early.run_at
    assert await store.next_due("push") is None


# -- claim -------------------------------------------------------------------------------------


async def test_claim_takes_due_jobs_oldest_first_up_to_the_limit(store: Store) -> None:
    second, first, third = new_job(delay=-20), new_job(delay=-30), new_job(delay=-10)
    await add(store, second, first, third, new_job("email"))
    claimed = await store.claim("sms", owner="me", limit=2, lease_seconds=LONG)
    assert [job.id for job in claimed] == [first.message.id, second.message.id]
    assert all(j.status is JobStatus.SENDING and j.attempts == 1 for j in claimed)
    assert [
        job.id for job in await store.claim("sms", owner="me", limit=5, lease_seconds=LONG)
    ] == [third.message.id]
    assert await store.claim("sms", owner="me", limit=5, lease_seconds=LONG) == []


async def test_a_claimed_job_is_not_claimed_again_by_anyone(store: Store) -> None:
    (job_id,) = await add(store)
    assert (await claim(store, "a")).id == job_id
    assert await store.claim("sms", owner="b", limit=10, lease_seconds=LONG) == []
    assert await status(store, job_id) is JobStatus.SENDING


# -- record ------------------------------------------------------------------------------------


async def test_record_delivered(store: Store) -> None:
    (job_id,) = await add(store)
    await claim(store)
    results = {"delivered": {"+14155550101": "SM1"}}
    assert await store.record("me", [Outcome(job_id, JobStatus.DELIVERED, results=results)]) == [
        True
    ]
    job = await store.get(job_id)
    assert job is not None
    assert (job.status, job.attempts, job.results) == (JobStatus.DELIVERED, 1, results)
    assert await store.claim("sms", owner="me", limit=10, lease_seconds=LONG) == []


async def test_record_retrying_keeps_the_job_and_its_results_until_it_is_due(
    store: Store,
) -> None:
    (job_id,) = await add(store)
    await claim(store)
    later = utcnow() + timedelta(hours=1)
    results = {"delivered": {"+14155550101": None}}
    outcome = Outcome(job_id, JobStatus.RETRYING, last_error="busy", run_at=later, results=results)
    assert await store.record("me", [outcome]) == [True]
    job = await store.get(job_id)
    assert job is not None
    assert (job.status, job.last_error, job.run_at, job.results) == (
        JobStatus.RETRYING,
        "busy",
        later,
        results,
    )
    assert await store.claim("sms", owner="me", limit=10, lease_seconds=LONG) == []
    assert await store.next_due("sms") == later


async def test_a_due_retry_is_claimed_again_with_one_more_attempt(store: Store) -> None:
    (job_id,) = await add(store)
    await claim(store)
    past = utcnow() - timedelta(seconds=1)
    await store.record("me", [Outcome(job_id, JobStatus.RETRYING, last_error="x", run_at=past)])
    again = await claim(store, "other")
    assert (again.id, again.attempts, again.last_error) == (job_id, 2, "x")


async def test_record_failed(store: Store) -> None:
    (job_id,) = await add(store)
    await claim(store)
    assert await store.record("me", [Outcome(job_id, JobStatus.FAILED, last_error="bad")]) == [True]
    job = await store.get(job_id)
    assert job is not None
    assert (job.status, job.last_error) == (JobStatus.FAILED, "bad")


async def test_record_applies_only_to_jobs_the_owner_still_holds(store: Store) -> None:
    mine_id, theirs_id, waiting_id = await add(
        store, new_job(delay=-2), new_job(delay=-1), new_job(delay=60)
    )
    await store.claim("sms", owner="me", limit=1, lease_seconds=LONG)
    await store.claim("sms", owner="them", limit=1, lease_seconds=LONG)
    outcomes = [Outcome(i, JobStatus.DELIVERED) for i in (mine_id, theirs_id, waiting_id)]
    assert await store.record("me", outcomes) == [True, False, False]
    assert await status(store, theirs_id) is JobStatus.SENDING
    assert await status(store, waiting_id) is JobStatus.QUEUED


async def test_record_twice_applies_once(store: Store) -> None:
    (job_id,) = await add(store)
    await claim(store)
    assert await store.record("me", [Outcome(job_id, JobStatus.DELIVERED)]) == [True]
    assert await store.record("me", [Outcome(job_id, JobStatus.FAILED)]) == [False]
    assert await status(store, job_id) is JobStatus.DELIVERED


# -- leases: extend, release, recover ----------------------------------------------------------


async def test_release_puts_the_job_back_due_now(store: Store) -> None:
    (job_id,) = await add(store)
    await claim(store)
    await store.release("them", [job_id])
    assert await status(store, job_id) is JobStatus.SENDING, "not theirs to release"
    await store.release("me", [job_id])
    job = await store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.RETRYING and job.last_error
    again = await claim(store, "other")
    assert (again.id, again.attempts) == (job_id, 2)


async def test_release_unheld_gives_back_only_the_owners_jobs_it_does_not_hold(
    store: Store,
) -> None:
    held_id, lost_id, theirs_id = await add(
        store, new_job(delay=-3), new_job(delay=-2), new_job(delay=-1)
    )
    email_id, *_ = await add(store, new_job("email", to=("a@example.com",)))
    await store.claim("sms", owner="me", limit=2, lease_seconds=LONG)
    await store.claim("sms", owner="them", limit=1, lease_seconds=LONG)
    await store.claim("email", owner="me", limit=1, lease_seconds=LONG)
    assert await store.release_unheld("me", "sms", [held_id]) == 1
    lost = await store.get(lost_id)
    assert lost is not None and lost.status is JobStatus.RETRYING and lost.last_error
    for job_id in (held_id, theirs_id, email_id):
        assert await status(store, job_id) is JobStatus.SENDING
    assert await store.release_unheld("me", "sms", []) == 1, "none held: all given back"
    again = await store.claim("sms", owner="other", limit=5, lease_seconds=LONG)
    assert {job.id for job in again} == {held_id, lost_id}


async def test_recover_requeues_run_out_leases_and_keeps_live_ones(store: Store) -> None:
    expired_id, live_id = await add(store, new_job(delay=-2), new_job(delay=-1))
    await store.claim("sms", owner="me", limit=1, lease_seconds=EXPIRED)
    await store.claim("sms", owner="me", limit=1, lease_seconds=LONG)
    assert await store.recover(owner="me") == 1
    assert await status(store, expired_id) is JobStatus.RETRYING
    assert await status(store, live_id) is JobStatus.SENDING
    assert (await claim(store, "other")).id == expired_id


async def test_extend_leases_keeps_a_slow_delivery_from_being_taken_over(store: Store) -> None:
    mine_id, theirs_id = await add(store, new_job(delay=-2), new_job(delay=-1))
    await store.claim("sms", owner="me", limit=1, lease_seconds=EXPIRED)
    await store.claim("sms", owner="them", limit=1, lease_seconds=EXPIRED)
    await store.extend_leases("me", [mine_id, theirs_id], LONG)
    assert await store.recover(owner="me") == 1
    assert await status(store, mine_id) is JobStatus.SENDING
    assert await status(store, theirs_id) is JobStatus.RETRYING
    assert await store.record("me", [Outcome(mine_id, JobStatus.DELIVERED)]) == [True]


# -- cancel, get, counts -----------------------------------------------------------------------


async def _job_in(store: Store, wanted: JobStatus) -> str:
    (job_id,) = await add(store)
    if wanted is JobStatus.QUEUED:
        return job_id
    await claim(store)
    if wanted is JobStatus.SENDING:
        return job_id
    if wanted is JobStatus.CANCELLED:
        await store.cancel(job_id)
        return job_id
    run_at = utcnow() + timedelta(hours=1) if wanted is JobStatus.RETRYING else None
    await store.record("me", [Outcome(job_id, wanted, last_error="e", run_at=run_at)])
    return job_id


@pytest.mark.parametrize("state", [JobStatus.QUEUED, JobStatus.RETRYING, JobStatus.SENDING])
async def test_cancel_a_job_not_finished(store: Store, state: JobStatus) -> None:
    job_id = await _job_in(store, state)
    assert await status(store, job_id) is state
    cancelled = await store.cancel(job_id)
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    assert await status(store, job_id) is JobStatus.CANCELLED
    assert await store.claim("sms", owner="x", limit=10, lease_seconds=LONG) == []
    assert await store.record("me", [Outcome(job_id, JobStatus.DELIVERED)]) == [False]
    assert await store.next_due("sms") is None


@pytest.mark.parametrize("state", [JobStatus.DELIVERED, JobStatus.FAILED, JobStatus.CANCELLED])
async def test_cancel_a_finished_job_changes_nothing(store: Store, state: JobStatus) -> None:
    job_id = await _job_in(store, state)
    before = await store.get(job_id)
    assert before is not None and before.status is state
    assert await store.cancel(job_id) == before


async def test_unknown_ids(store: Store) -> None:
    assert await store.get("nope") is None
    assert await store.cancel("nope") is None


async def test_count_by_status_counts_every_state(store: Store) -> None:
    assert await store.count_by_status() == dict.fromkeys(JobStatus, 0)
    for state, n in [  # queued last: _job_in claims the one due job it has just added
        (JobStatus.SENDING, 2),
        (JobStatus.RETRYING, 1),
        (JobStatus.DELIVERED, 3),
        (JobStatus.FAILED, 1),
        (JobStatus.CANCELLED, 2),
        (JobStatus.QUEUED, 1),
    ]:
        for _ in range(n):
            await _job_in(store, state)
    assert await store.count_by_status() == {
        JobStatus.QUEUED: 1,
        JobStatus.SENDING: 2,
        JobStatus.RETRYING: 1,
        JobStatus.DELIVERED: 3,
        JobStatus.FAILED: 1,
        JobStatus.CANCELLED: 2,
    }


async def test_ping(store: Store) -> None:
    await store.ping()


# -- administration ----------------------------------------------------------------------------


async def test_list_jobs_filters_and_shows_the_latest_changes_first(store: Store) -> None:
    failed_id = await _job_in(store, JobStatus.FAILED)
    delivered_id = await _job_in(store, JobStatus.DELIVERED)
    queued_id = await _job_in(store, JobStatus.QUEUED)
    listed = await store.list_jobs(status=None, since=None, limit=10)
    assert [job.id for job in listed] == [queued_id, delivered_id, failed_id]
    assert [j.id for j in await store.list_jobs(status=None, since=None, limit=2)] == [
        queued_id,
        delivered_id,
    ]
    only_failed = await store.list_jobs(status=JobStatus.FAILED, since=None, limit=10)
    assert [job.id for job in only_failed] == [failed_id]
    later = utcnow() + timedelta(hours=1)
    assert await store.list_jobs(status=None, since=later, limit=10) == []


async def test_retry_requeues_failed_jobs_with_a_fresh_budget(store: Store) -> None:
    failed_ids = [await _job_in(store, JobStatus.FAILED) for _ in range(2)]
    delivered_id = await _job_in(store, JobStatus.DELIVERED)
    assert await store.retry(job_ids=[failed_ids[0], delivered_id], since=None) == [failed_ids[0]]
    job = await store.get(failed_ids[0])
    assert job is not None and (job.status, job.attempts) == (JobStatus.QUEUED, 0)
    counts = await store.count_by_status()
    assert (counts[JobStatus.QUEUED], counts[JobStatus.FAILED]) == (1, 1)
    assert await store.retry(job_ids=None, since=utcnow() + timedelta(hours=1)) == []
    assert await store.retry(job_ids=None, since=None) == [failed_ids[1]]
    assert (await store.count_by_status())[JobStatus.FAILED] == 0
    claimed = await store.claim("sms", owner="me", limit=10, lease_seconds=LONG)
    assert sorted(job.id for job in claimed) == sorted(failed_ids)
    assert all(job.attempts == 1 for job in claimed)


async def test_purge_deletes_only_finished_jobs_changed_before_the_cutoff(store: Store) -> None:
    kept = [await _job_in(store, s) for s in (JobStatus.SENDING, JobStatus.RETRYING)]
    finished = [
        await _job_in(store, s)
        for s in (JobStatus.DELIVERED, JobStatus.FAILED, JobStatus.CANCELLED)
    ]
    kept.append(await _job_in(store, JobStatus.QUEUED))
    assert await store.purge(before=utcnow() - timedelta(hours=1)) == 0
    assert await store.purge(before=utcnow() + timedelta(hours=1)) == len(finished)
    assert [await store.get(job_id) for job_id in finished] == [None] * len(finished)
    assert all([await store.get(job_id) for job_id in kept])
    counts = await store.count_by_status()
    assert sum(counts.values()) == len(kept)


# -- version 1.1: priorities -------------------------------------------------------------------


def with_(job: NewJob, **fields: Any) -> NewJob:
    """``job`` with NewJob-level fields (priority, collapse, callback_url) set."""
    return replace(job, **fields)


async def test_claim_takes_high_before_normal_before_low_each_by_due_time(store: Store) -> None:
    low, normal_late, high, normal_early = await add(
        store,
        with_(new_job(delay=-4), priority=Priority.LOW),
        with_(new_job(delay=-1), priority=Priority.NORMAL),
        with_(new_job(delay=-2), priority=Priority.HIGH),
        with_(new_job(delay=-3), priority=Priority.NORMAL),
    )
    order = []
    for _ in range(4):
        order.append((await claim(store, limit=1)).id)
    assert order == [high, normal_early, normal_late, low]
    job = await store.get(high)
    assert job is not None and job.priority is Priority.HIGH
    assert job.to_status()["priority"] == "high"


async def test_claim_gives_oldest_slots_to_the_longest_waiting_whatever_their_priority(
    store: Store,
) -> None:
    (old_low,) = await add(store, with_(new_job(delay=-60), priority=Priority.LOW))
    highs = await add(store, *(with_(new_job(delay=-1), priority=Priority.HIGH) for _ in range(3)))
    claimed = await store.claim("sms", owner="me", limit=2, lease_seconds=LONG, oldest=1)
    assert {job.id for job in claimed} == {old_low, highs[0]}


# -- collapsing --------------------------------------------------------------------------------


async def test_a_newer_job_with_the_same_collapse_value_supersedes_waiting_ones(
    store: Store,
) -> None:
    first, other_key = await add(
        store, with_(new_job(), collapse="c1"), with_(new_job(), collapse="c2")
    )
    (second,) = await add(store, with_(new_job(), collapse="c1"))
    (third,) = await add(store, with_(new_job(), collapse="c1"))
    for older, newer in ((first, second), (second, third)):
        job = await store.get(older)
        assert job is not None
        assert (job.status, job.superseded_by) == (JobStatus.CANCELLED, newer)
        assert job.to_status()["superseded_by"] == newer
    assert await status(store, other_key) is JobStatus.QUEUED
    assert await status(store, third) is JobStatus.QUEUED


async def test_the_later_of_two_in_one_batch_supersedes_the_earlier(store: Store) -> None:
    earlier, later = await add(
        store, with_(new_job(), collapse="c"), with_(new_job(), collapse="c")
    )
    job = await store.get(earlier)
    assert job is not None
    assert (job.status, job.superseded_by) == (JobStatus.CANCELLED, later)
    assert await status(store, later) is JobStatus.QUEUED
    counts = await store.count_by_status()
    assert (counts[JobStatus.CANCELLED], counts[JobStatus.QUEUED]) == (1, 1)


async def test_collapsing_skips_a_job_already_being_sent(store: Store) -> None:
    (first,) = await add(store, with_(new_job(), collapse="c"))
    await claim(store)
    (second,) = await add(store, with_(new_job(), collapse="c"))
    assert await status(store, first) is JobStatus.SENDING
    assert await status(store, second) is JobStatus.QUEUED


async def test_an_idempotent_repeat_does_not_collapse(store: Store) -> None:
    (first,) = await add(store, with_(new_job(key="k"), collapse="c"))
    assert await store.enqueue([with_(new_job(key="k"), collapse="c")]) == [
        Enqueued(first, duplicate=True)
    ]
    assert await status(store, first) is JobStatus.QUEUED


# -- callbacks (the events outbox) -------------------------------------------------------------

HOOK = "http://127.0.0.1:9/hook"


async def finish(store: Store, job_id: str, state: JobStatus = JobStatus.DELIVERED) -> None:
    job = await claim(store, limit=1)
    assert job.id == job_id
    results = {"delivered": {"+14155550101": "SM-" + job_id}}
    await store.record("me", [Outcome(job_id, state, results=results)])


async def test_a_final_status_writes_one_pending_event(store: Store) -> None:
    (job_id,) = await add(store, with_(new_job(), callback_url=HOOK))
    (plain,) = await add(store, new_job(delay=60))
    await finish(store, job_id)
    (event,) = await store.claim_events(owner="me", limit=10, lease_seconds=LONG)
    assert (event.type, event.url, event.attempts, event.job.id) == ("job.final", HOOK, 1, job_id)
    assert event.job.status is JobStatus.DELIVERED
    assert await store.claim_events(owner="other", limit=10, lease_seconds=LONG) == []
    job = await store.get(job_id)
    assert job is not None and job.callback == {
        "state": "pending",
        "attempts": 1,
        "last_error": None,
    }
    plain_job = await store.get(plain)
    assert plain_job is not None and plain_job.callback is None


async def test_event_outcomes_sent_retry_and_given_up(store: Store) -> None:
    ids = await add(store, *(with_(new_job(delay=-3 + i), callback_url=HOOK) for i in range(3)))
    for job_id in ids:
        await finish(store, job_id)
    events = await store.claim_events(owner="me", limit=10, lease_seconds=LONG)
    by_job = {event.job.id: event for event in events}
    sent, again, given_up = (by_job[i] for i in ids)
    past = utcnow() - timedelta(seconds=1)
    await store.record_events(
        "me",
        [
            EventOutcome(sent.id, CallbackState.SENT),
            EventOutcome(again.id, CallbackState.PENDING, last_error="HTTP 500", run_at=past),
            EventOutcome(given_up.id, CallbackState.FAILED, last_error="HTTP 404"),
        ],
    )
    (retried,) = await store.claim_events(owner="other", limit=10, lease_seconds=LONG)
    assert (retried.id, retried.attempts) == (again.id, 2), "the same event_id, once more"
    states = {}
    for job_id in ids:
        job = await store.get(job_id)
        assert job is not None and job.callback is not None
        states[job_id] = (job.callback["state"], job.callback["last_error"])
    assert states == {
        ids[0]: ("sent", None),
        ids[1]: ("pending", "HTTP 500"),
        ids[2]: ("failed", "HTTP 404"),
    }


async def test_cancelled_and_failed_are_final_too_and_retry_adds_no_second_final(
    store: Store,
) -> None:
    cancelled, failed = await add(
        store,
        with_(new_job(delay=60), callback_url=HOOK),
        with_(new_job(), callback_url=HOOK),
    )
    await store.cancel(cancelled)
    await finish(store, failed, JobStatus.FAILED)
    await store.retry(job_ids=[failed], since=None)
    await finish(store, failed, JobStatus.DELIVERED)
    events = await store.claim_events(owner="me", limit=10, lease_seconds=LONG)
    assert sorted((e.job.id, e.type) for e in events) == sorted(
        [(cancelled, "job.final"), (failed, "job.final")]
    )


async def test_an_expired_event_lease_is_claimed_again(store: Store) -> None:
    (job_id,) = await add(store, with_(new_job(), callback_url=HOOK))
    await finish(store, job_id)
    (first,) = await store.claim_events(owner="me", limit=10, lease_seconds=EXPIRED)
    (again,) = await store.claim_events(owner="other", limit=10, lease_seconds=LONG)
    assert again.id == first.id


# -- receipts ----------------------------------------------------------------------------------


def report(reference: str, state: ReceiptState, **fields: Any) -> ReceiptReport:
    values: dict[str, Any] = {"by": "provider_id", "recipient": None, "reason": None}
    values.update(fields)
    return ReceiptReport(reference=reference, state=state, at=utcnow(), **values)


async def test_a_receipt_by_provider_id_is_recorded_per_recipient(store: Store) -> None:
    (job_id,) = await add(store, with_(new_job(), callback_url=HOOK))
    await finish(store, job_id)
    matched = await store.record_receipts(
        [
            report("SM-" + job_id, ReceiptState.UNDELIVERED, reason="30003"),
            report("nope", ReceiptState.DELIVERED),
        ]
    )
    assert matched == [True, False]
    job = await store.get(job_id)
    assert job is not None
    receipt = job.receipts["+14155550101"]
    assert (receipt["state"], receipt["reason"]) == ("undelivered", "30003")
    events = await store.claim_events(owner="me", limit=10, lease_seconds=LONG)
    assert sorted(e.type for e in events) == ["job.final", "job.receipt"]


async def test_a_duplicate_receipt_changes_nothing(store: Store) -> None:
    (job_id,) = await add(store, with_(new_job(), callback_url=HOOK))
    await finish(store, job_id)
    for _ in range(3):
        await store.record_receipts([report("SM-" + job_id, ReceiptState.DELIVERED)])
    events = await store.claim_events(owner="me", limit=10, lease_seconds=LONG)
    assert sorted(e.type for e in events) == ["job.final", "job.receipt"]


async def test_a_receipt_before_the_delivery_is_recorded_is_applied_then(store: Store) -> None:
    (job_id,) = await add(store)
    assert await store.record_receipts([report("SM-" + job_id, ReceiptState.DELIVERED)]) == [False]
    await finish(store, job_id)
    job = await store.get(job_id)
    assert job is not None and job.receipts["+14155550101"]["state"] == "delivered"


async def test_a_receipt_by_job_id_matches_the_recipient_as_the_job_spells_it(store: Store) -> None:
    job = new_job("email", to=("张三 <Zhang.San@example.com>", "b@example.com"))
    (job_id,) = await add(store, job)
    (claimed,) = await store.claim("email", owner="me", limit=1, lease_seconds=LONG)
    await store.record("me", [Outcome(claimed.id, JobStatus.DELIVERED)])
    bounce = report(
        job_id,
        ReceiptState.BOUNCED,
        by="job_id",
        recipient="zhang.san@example.com",
        reason="5.1.1 no such user",
    )
    assert await store.record_receipts(
        [bounce, report("nope", ReceiptState.BOUNCED, by="job_id", recipient="x@example.com")]
    ) == [True, False]
    stored = await store.get(job_id)
    assert stored is not None
    assert stored.receipts["张三 <Zhang.San@example.com>"]["state"] == "bounced"
    assert await store.suppressed({"zhang.san@example.com", "b@example.com"}) == {
        "zhang.san@example.com": "5.1.1 no such user"
    }


async def test_a_soft_bounce_does_not_suppress(store: Store) -> None:
    (job_id,) = await add(store, new_job("email", to=("a@example.com",)))
    bounce = report(
        job_id,
        ReceiptState.BOUNCED,
        by="job_id",
        recipient="a@example.com",
        reason="4.2.2 mailbox full",
    )
    assert await store.record_receipts([bounce]) == [True]
    assert await store.suppressed({"a@example.com"}) == {}


# -- suppression -------------------------------------------------------------------------------


async def test_suppress_list_and_unsuppress(store: Store) -> None:
    await store.suppress("a@example.com", "complained")
    await store.suppress("a@example.com", "again")
    await store.suppress("b@example.com", "bounced")
    listed = await store.list_suppressions()
    assert [(s.address, s.reason) for s in listed] == [
        ("a@example.com", "complained"),
        ("b@example.com", "bounced"),
    ]
    assert await store.unsuppress("a@example.com") is True
    assert await store.unsuppress("a@example.com") is False
    assert await store.suppressed({"a@example.com", "b@example.com"}) == {
        "b@example.com": "bounced"
    }


# -- pacing ------------------------------------------------------------------------------------

PER_HOUR = (RecipientLimit(2, 3600.0),)


async def test_pace_admits_up_to_the_limit_and_defers_the_rest_without_an_attempt(
    store: Store,
) -> None:
    ids = await add(store, *(new_job(delay=-3 + i) for i in range(3)))
    jobs = await store.claim("sms", owner="me", limit=10, lease_seconds=LONG)
    deferred = await store.pace("me", jobs, PER_HOUR)
    assert list(deferred) == [ids[2]]
    waiting = await store.get(ids[2])
    assert waiting is not None
    assert waiting.status is JobStatus.QUEUED and waiting.attempts == 0
    assert waiting.run_at > utcnow() + timedelta(minutes=59)
    assert await status(store, ids[0]) is JobStatus.SENDING


async def test_pace_counts_sends_across_claims_and_other_recipients_pass(store: Store) -> None:
    await add(store, new_job(delay=-2), new_job(delay=-1))
    assert (
        await store.pace(
            "me", await store.claim("sms", owner="me", limit=10, lease_seconds=LONG), PER_HOUR
        )
        == {}
    )
    other = new_job(to=("+14155550102",))
    (same,) = await add(store, new_job())
    await add(store, other)
    jobs = await store.claim("sms", owner="me", limit=10, lease_seconds=LONG)
    assert list(await store.pace("me", jobs, PER_HOUR)) == [same]


async def _fail_one_and_pace_another(store: Store, owner: str, jobs: list[Job]) -> None:
    """A failed send gives its pacing count back: the next job to that number goes out."""
    failed = Outcome(jobs[0].id, JobStatus.FAILED, last_error="refused")
    assert await store.record(owner, [failed]) == [True]
    (third,) = await add(store, new_job())
    claimed = await store.claim("sms", owner=owner, limit=10, lease_seconds=LONG)
    assert await store.pace(owner, [j for j in claimed if j.id == third], PER_HOUR) == {}


async def test_a_failed_send_gives_its_count_back(store: Store) -> None:
    await add(store, new_job(delay=-2), new_job(delay=-1))
    jobs = await store.claim("sms", owner="me", limit=10, lease_seconds=LONG)
    assert await store.pace("me", jobs, PER_HOUR) == {}
    await _fail_one_and_pace_another(store, "me", jobs)


async def test_sqlite_gives_a_failed_sends_count_back_after_a_restart(tmp_path: Path) -> None:
    """The counts were taken before this start (a SQLite file is one instance's, so a restart
    is the store's): they are given back all the same."""
    first = SQLiteStore(tmp_path / "notifier.db")
    await first.open()
    try:
        await add(first, new_job(delay=-2), new_job(delay=-1))
        jobs = await first.claim("sms", owner="me", limit=10, lease_seconds=LONG)
        assert await first.pace("me", jobs, PER_HOUR) == {}
    finally:
        await first.close()
    again = SQLiteStore(tmp_path / "notifier.db")
    await again.open()
    try:
        owner = "me, started again"
        await again.recover(owner=owner)
        jobs = await again.claim("sms", owner=owner, limit=10, lease_seconds=LONG)
        await _fail_one_and_pace_another(again, owner, jobs)
    finally:
        await again.close()


async def test_a_hold_defers_every_job_to_that_number(store: Store) -> None:
    until = utcnow() + timedelta(minutes=5)
    await store.hold_recipients({"+14155550101": until})
    (job_id,) = await add(store)
    jobs = await store.claim("sms", owner="me", limit=10, lease_seconds=LONG)
    deferred = await store.pace("me", jobs, PER_HOUR)
    assert abs((deferred[job_id] - until).total_seconds()) < 1


async def test_a_claim_is_full_when_the_oldest_is_also_first_by_priority(store: Store) -> None:
    await add(store, *(new_job(delay=-5 + i) for i in range(5)))
    claimed = await store.claim("sms", owner="me", limit=3, lease_seconds=LONG, oldest=1)
    assert len(claimed) == 3


async def test_count_waiting_by_channel_and_priority(store: Store) -> None:
    await add(
        store,
        with_(new_job(), priority=Priority.HIGH),
        with_(new_job(delay=60), priority=Priority.HIGH),
        new_job(),
        with_(new_job("email", to=("a@example.com",)), priority=Priority.LOW),
    )
    await store.claim("sms", owner="me", limit=1, lease_seconds=LONG)
    assert await store.count_waiting() == {
        ("sms", Priority.HIGH): 1,
        ("sms", Priority.NORMAL): 1,
        ("email", Priority.LOW): 1,
    }


async def test_exclusive_is_held_by_one_holder_at_a_time(
    store: Store, store_settings: Settings
) -> None:
    if isinstance(store, SQLiteStore):
        async with store.exclusive("bounces") as mine:
            assert mine, "one process owns an SQLite store: always its own"
        return
    other = open_store(store_settings)
    await other.open()
    try:
        async with store.exclusive("bounces") as mine, other.exclusive("bounces") as theirs:
            assert (mine, theirs) == (True, False)
        async with other.exclusive("bounces") as theirs:
            assert theirs
    finally:
        await other.close()


async def test_what_the_exclusive_block_raises_is_its_own(store: Store) -> None:
    with pytest.raises(ConnectionError, match="mailbox"):
        async with store.exclusive("bounces"):
            raise ConnectionError("mailbox unreachable")


async def test_a_send_that_failed_gives_its_count_back(store: Store) -> None:
    one_per_hour = (RecipientLimit(1, 3600.0),)
    (first,) = await add(store)
    assert await store.pace("me", [await claim(store)], one_per_hour) == {}
    past = utcnow() - timedelta(seconds=1)
    await store.record("me", [Outcome(first, JobStatus.RETRYING, last_error="500", run_at=past)])
    again = await claim(store)
    assert await store.pace("me", [again], one_per_hour) == {}, "the failed attempt sent nothing"
    await store.record("me", [Outcome(first, JobStatus.DELIVERED)])
    (second,) = await add(store)
    assert list(await store.pace("me", [await claim(store)], one_per_hour)) == [second]


# -- dashboard ---------------------------------------------------------------------------------


async def test_search_jobs_by_each_criterion_newest_first(store: Store) -> None:
    (older,) = await add(store, new_job(key="order-1", to=("+14155550101",)))
    (email,) = await add(store, new_job("email", key="order-2", to=("Ann@Example.com",)))
    (newest,) = await add(store, new_job(to=("+14155550102", "+14155550101")))
    await store.cancel(newest)

    async def found(**criteria: Any) -> list[str]:
        return [job.id for job in await store.search_jobs(JobSearch(**criteria))]

    assert await found() == [newest, email, older]
    assert await found(limit=2) == [newest, email]
    assert await found(job_id=email) == [email]
    assert await found(job_id="nope") == []
    assert await found(idempotency_key="order-1") == [older]
    assert await found(recipient="ann@example.COM") == [email], "any case"
    assert await found(recipient="+14155550101") == [older], "the first recipient"
    assert await found(status=JobStatus.CANCELLED) == [newest]
    assert await found(status=JobStatus.QUEUED, recipient="+14155550101") == [older]
    created = []
    for job_id in (older, email, newest):
        job = await store.get(job_id)
        assert job is not None
        created.append(job.created_at)
    # Moments between the jobs', as a stored time may not round-trip to the microsecond.
    after_older, after_email = (a + (b - a) / 2 for a, b in itertools.pairwise(created))
    assert await found(created_from=after_older) == [newest, email]
    assert await found(created_until=after_older) == [older]
    assert await found(created_from=after_older, created_until=after_email) == [email]


async def test_recent_failures_are_failed_and_retrying_jobs_latest_first(store: Store) -> None:
    first, delivered, retrying, second, queued = await add(
        store, *(new_job(delay=-5 + i) for i in range(5))
    )
    await finish(store, first, JobStatus.FAILED)
    await finish(store, delivered)
    assert (await claim(store, limit=1)).id == retrying
    later = utcnow() + timedelta(hours=1)
    await store.record("me", [Outcome(retrying, JobStatus.RETRYING, "HTTP 503", run_at=later)])
    await finish(store, second, JobStatus.FAILED)
    assert [job.id for job in await store.recent_failures(10)] == [second, retrying, first]
    assert [job.id for job in await store.recent_failures(1)] == [second]
    assert await store.retry(job_ids=[second], since=None) == [second]
    assert [job.id for job in await store.recent_failures(10)] == [retrying, first]
    assert queued not in {job.id for job in await store.recent_failures(10)}


async def test_outcomes_per_minute_count_delivered_and_failed(store: Store) -> None:
    ids = await add(store, *(new_job(delay=-4 + i) for i in range(4)))
    states = [JobStatus.DELIVERED, JobStatus.DELIVERED, JobStatus.FAILED]
    for job_id, state in zip(ids, states, strict=False):
        await finish(store, job_id, state)
    await store.cancel(ids[3])
    hour_ago = utcnow() - timedelta(hours=1)
    minutes = await store.outcomes_per_minute(hour_ago)
    assert sum(m.delivered for m in minutes) == 2 and sum(m.failed for m in minutes) == 1
    for m in minutes:
        assert m.minute.second == 0 and m.minute.microsecond == 0
        assert hour_ago - timedelta(minutes=1) < m.minute <= utcnow()
    assert minutes == sorted(minutes, key=lambda m: m.minute)
    assert await store.outcomes_per_minute(utcnow() + timedelta(minutes=1)) == []


async def test_callback_backlog_counts_events_not_yet_posted(store: Store) -> None:
    assert await store.callback_backlog() == CallbackBacklog(0, None)
    (job_id,) = await add(store, with_(new_job(), callback_url=HOOK))
    await finish(store, job_id)
    backlog = await store.callback_backlog()
    assert backlog.pending == 1 and backlog.oldest is not None
    assert utcnow() - timedelta(minutes=1) < backlog.oldest <= utcnow()
    (event,) = await store.claim_events(owner="me", limit=10, lease_seconds=LONG)
    assert (await store.callback_backlog()).pending == 1, "claimed is not posted yet"
    await store.record_events("me", [EventOutcome(event.id, CallbackState.SENT)])
    assert await store.callback_backlog() == CallbackBacklog(0, None)


# -- tables that grow --------------------------------------------------------------------------


async def test_purge_goes_in_batches_until_nothing_old_is_left(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[type(store).__module__], "PURGE_BATCH", 2)
    finished = [await _job_in(store, JobStatus.DELIVERED) for _ in range(5)]
    (kept,) = await add(store)
    assert await store.purge(before=utcnow() + timedelta(hours=1)) == len(finished)
    assert [await store.get(job_id) for job_id in finished] == [None] * len(finished)
    assert await store.get(kept) is not None
    counts = await store.count_by_status()
    assert (counts[JobStatus.DELIVERED], counts[JobStatus.QUEUED]) == (0, 1)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "notifier.db")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def test_sqlite_purge_deletes_one_batch_per_statement(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Intake waits for one batch at most: the one writer is never held for the whole purge."""
    monkeypatch.setattr(sqlite_module, "PURGE_BATCH", 2)
    for _ in range(5):
        await _job_in(sqlite_store, JobStatus.DELIVERED)
    batches: list[Sequence[Any]] = []
    count = sqlite_store._count

    async def counted(statement: str, params: Sequence[Any] = ()) -> int:
        if statement == sqlite_module.PURGE:
            batches.append(params)
        return await count(statement, params)

    monkeypatch.setattr(sqlite_store, "_count", counted)
    assert await sqlite_store.purge(before=utcnow() + timedelta(hours=1)) == 5
    assert [limit for _, limit in batches] == [2, 2, 2]


def sqlite_plan(path: Path, statement: str, params: Sequence[Any]) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", params)]
    finally:
        db.close()


#: Partial indexes of work not finished: a count may read one whole, as it is as small as
#: the queue; the table, and the finished part of it, only ever grow.
UNFINISHED_INDEXES = frozenset({"jobs_due", "jobs_due_by_priority", "jobs_leased"})


async def test_sqlite_hot_statements_read_indexes_not_the_table(sqlite_store: SQLiteStore) -> None:
    """On a grown file (and analyzed: the planner knows how big it is)."""
    grow_sqlite(sqlite_store.path, queued=20_000, finished=20_000, due=100)
    now = time.time()
    outcome = json.dumps([{"id": "x", "status": "delivered"}])
    statements: dict[str, tuple[str, Sequence[Any]]] = {
        "claim": (sqlite_module.CLAIM[False], ("me", now + 60, now, "sms", 0, 32)),
        "claim with oldest": (sqlite_module.CLAIM[True], ("me", now + 60, now, "sms", 4, 32)),
        "record": (sqlite_module.RECORD, (now, outcome, "me")),
        "next due": (sqlite_module.NEXT_DUE, ("sms",)),
        "status": (sqlite_module.GET, ("x",)),
        "counts": (sqlite_module.COUNT_BY_STATUS, ()),
        "waiting": (sql.COUNT_WAITING, ()),
        "purge": (sqlite_module.PURGE, (now, 1000)),
    }
    for name, (statement, params) in statements.items():
        plan = sqlite_plan(sqlite_store.path, statement, params)
        scans = [
            line
            for line in plan
            if (scan := re.fullmatch(r"SCAN jobs(?: USING (?:COVERING )?INDEX (\w+))?", line))
            and scan[1] not in UNFINISHED_INDEXES
        ]
        assert not scans, (name, plan)


def claim_steps(path: Path, limit: int) -> int:
    """How many steps of SQLite's virtual machine one claim takes (rolled back)."""
    db = sqlite3.connect(path, isolation_level=None)
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        db.set_progress_handler(step, 10)
        db.execute("BEGIN")
        now = time.time()
        db.execute(sqlite_module.CLAIM[True], ("me", now + 60, now, "sms", 4, limit)).fetchall()
        db.execute("ROLLBACK")
    finally:
        db.close()
    return steps


async def test_sqlite_a_claim_reads_as_much_however_many_jobs_wait(
    sqlite_store: SQLiteStore,
) -> None:
    """Jobs queued for later, finished ones and a backlog of due ones cost a claim nothing
    more: neither one that takes all that is due (fewer than its limit) nor a full one."""
    grow_sqlite(sqlite_store.path, queued=0, finished=0, due=40)
    full, drained = claim_steps(sqlite_store.path, 32), claim_steps(sqlite_store.path, 64)
    grow_sqlite(sqlite_store.path, queued=20_000, finished=20_000)
    assert claim_steps(sqlite_store.path, 64) < 2 * drained
    grow_sqlite(sqlite_store.path, queued=0, finished=0, due=5_000)
    assert claim_steps(sqlite_store.path, 32) < 2 * full


async def test_a_version_2_file_is_upgraded_with_its_jobs_counted(tmp_path: Path) -> None:
    path = tmp_path / "notifier.db"
    store = SQLiteStore(path)
    await store.open()
    finished = [await _job_in(store, JobStatus.DELIVERED) for _ in range(2)]
    (waiting,) = await add(store)
    await store.close()
    as_version_2(path)

    store = SQLiteStore(path)
    await store.open()
    try:
        counts = await store.count_by_status()
        assert (counts[JobStatus.DELIVERED], counts[JobStatus.QUEUED]) == (len(finished), 1)
        assert (await claim(store)).id == waiting
        await store.record("me", [Outcome(waiting, JobStatus.FAILED, last_error="no")])
        assert (await store.count_by_status())[JobStatus.FAILED] == 1
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == sqlite_module.SCHEMA_VERSION
        (due,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs_due'").fetchone()
        assert "run_at, id" in due
    finally:
        db.close()


def as_version_2(path: Path) -> None:
    """The file as version 2 left it: due indexes without ``id``, no ``job_totals``."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.executescript(
            "DROP TRIGGER jobs_tally; DROP TRIGGER jobs_untally; DROP TABLE job_totals;"
            " DROP INDEX jobs_due; DROP INDEX jobs_due_by_priority;"
            f" CREATE INDEX jobs_due ON jobs (channel, run_at) WHERE {sql.WAITING};"
            " CREATE INDEX jobs_due_by_priority ON jobs (channel, priority, run_at)"
            f" WHERE {sql.WAITING}; PRAGMA user_version = 2;"
        )
    finally:
        db.close()
