"""Routing and admin rules, without TCP: the handler over a real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from notifier.admin import AdminLimit
from notifier.errors import InvalidRequest, NotFound, RateLimited, Unavailable, UnknownChannel
from notifier.handler import LIMITED_OPS, Handler
from notifier.intake import Intake
from notifier.metrics import Metrics
from notifier.models import Enqueued, JobStatus, NewJob, Outcome
from notifier.protocol import OPS, parse_request
from notifier.service import Service
from notifier.settings import RecipientLimit
from notifier.store import Store, StoreUnavailable
from notifier.templates import Templates
from tests.support.clock import Clock
from tests.support.server import isolated_settings

SMS = {"channel": "sms", "to": "+14155550101", "text": "code 1234"}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """The SQLite store the service would use (built, not started, by the service itself)."""
    opened = Service(isolated_settings(tmp_path)).store
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def handler(tmp_path: Path, store: Store) -> AsyncIterator[Handler]:
    intake = Intake(
        store,
        channels=("email", "sms"),
        templates=Templates(tmp_path / "templates"),
        sender="notifier@example.com",
        metrics=Metrics(),
    )
    yield Handler(intake=intake, store=store)
    await intake.drain()


async def handle(handler: Handler, request: dict[str, Any]) -> dict[str, Any]:
    return await handler.handle(parse_request(request))


async def job_in(handler: Handler, store: Store, status: JobStatus) -> str:
    """A job sent through the handler, then delivered or failed as the dispatcher would."""
    job_id: str = (await handle(handler, SMS))["id"]
    if status is not JobStatus.QUEUED:
        (claimed,) = await store.claim("sms", owner="test", limit=1, lease_seconds=300)
        await store.record("test", [Outcome(claimed.id, status, last_error="gateway said no")])
    return job_id


async def test_every_op_of_the_protocol_is_routed(handler: Handler, store: Store) -> None:
    job_id = await job_in(handler, store, JobStatus.QUEUED)
    smallest = {
        "send": SMS,
        "status": {"op": "status", "id": job_id},
        "cancel": {"op": "cancel", "id": job_id},
        "ping": {"op": "ping"},
        "auth": {"op": "auth", "token": "checked by the server"},
        "jobs": {"op": "jobs"},
        "retry": {"op": "retry", "since": "1h"},
        "purge": {"op": "purge", "older_than": "30d"},
        "suppressions": {"op": "suppressions"},
        "suppress": {"op": "suppress", "address": "a@example.com"},
        "unsuppress": {"op": "unsuppress", "address": "a@example.com"},
    }
    assert set(smallest) == set(OPS), "a new op needs a route (and a line here)"
    for op, request in smallest.items():
        assert isinstance(await handle(handler, request), dict), op


async def test_send_answers_the_stored_job(handler: Handler, store: Store) -> None:
    first = await handle(handler, {**SMS, "idempotency_key": "order-1"})
    assert first == {"id": first["id"], "status": "queued"}
    again = await handle(handler, {**SMS, "idempotency_key": "order-1"})
    assert again == {"id": first["id"], "status": "queued", "duplicate": True}
    job = await store.get(first["id"])
    assert job is not None and job.status is JobStatus.QUEUED


async def test_a_refused_send_raises_at_once(handler: Handler) -> None:
    with pytest.raises(UnknownChannel, match="pigeon"):
        handler.handle(parse_request({**SMS, "channel": "pigeon"}))
    with pytest.raises(InvalidRequest, match=r"^text"):
        handler.handle(parse_request({"channel": "sms", "to": "+14155550101"}))


async def test_sends_started_together_share_one_commit_in_order(
    handler: Handler, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[list[str]] = []
    enqueue = store.enqueue

    async def recording(jobs: Sequence[NewJob]) -> list[Enqueued]:
        batches.append([job.message.text or "" for job in jobs])
        return await enqueue(jobs)

    monkeypatch.setattr(store, "enqueue", recording)
    started = [handler.handle(parse_request({**SMS, "text": f"#{n}"})) for n in range(50)]
    answers = await asyncio.gather(*started)
    assert batches == [[f"#{n}" for n in range(50)]]
    assert len({answer["id"] for answer in answers}) == 50


async def test_status_and_cancel(handler: Handler) -> None:
    job_id = (await handle(handler, {**SMS, "send_at": "2999-01-01T00:00:00Z"}))["id"]
    status = await handle(handler, {"op": "status", "id": job_id})
    assert (status["id"], status["status"], status["channel"]) == (job_id, "queued", "sms")
    cancelled = await handle(handler, {"op": "cancel", "id": job_id})
    assert cancelled["status"] == "cancelled"
    for op in ("status", "cancel"):
        with pytest.raises(NotFound, match=r"^id"):
            await handle(handler, {"op": op, "id": "no-such-job"})


async def test_only_failed_jobs_are_retried(handler: Handler, store: Store) -> None:
    failed = await job_in(handler, store, JobStatus.FAILED)
    delivered = await job_in(handler, store, JobStatus.DELIVERED)
    assert await handle(handler, {"op": "retry", "id": failed}) == {"ids": [failed]}
    job = await store.get(failed)
    assert job is not None and job.status is JobStatus.QUEUED

    with pytest.raises(InvalidRequest, match=r"job is delivered; only failed jobs are retried"):
        await handle(handler, {"op": "retry", "id": delivered})
    with pytest.raises(InvalidRequest, match="job is queued"):
        await handle(handler, {"op": "retry", "id": failed})
    with pytest.raises(NotFound):
        await handle(handler, {"op": "retry", "id": "no-such-job"})
    with pytest.raises(InvalidRequest, match=r"^id: give a job id, or since"):
        await handle(handler, {"op": "retry"})


async def test_retry_every_job_failed_since(handler: Handler, store: Store) -> None:
    failed = [await job_in(handler, store, JobStatus.FAILED) for _ in range(2)]
    await job_in(handler, store, JobStatus.DELIVERED)
    retried = await handle(handler, {"op": "retry", "since": "1h"})
    assert sorted(retried["ids"]) == sorted(failed)
    assert await handle(handler, {"op": "retry", "since": "1h"}) == {"ids": []}


async def test_jobs_lists_by_status(handler: Handler, store: Store) -> None:
    failed = await job_in(handler, store, JobStatus.FAILED)
    queued = await job_in(handler, store, JobStatus.QUEUED)
    listed = await handle(handler, {"op": "jobs", "status": "failed"})
    assert [job["id"] for job in listed["jobs"]] == [failed]
    assert listed["jobs"][0]["last_error"] == "gateway said no"
    everything = await handle(handler, {"op": "jobs", "limit": 10})
    assert {job["id"] for job in everything["jobs"]} == {failed, queued}


async def test_purge_deletes_finished_jobs(handler: Handler, store: Store) -> None:
    delivered = await job_in(handler, store, JobStatus.DELIVERED)
    queued = await job_in(handler, store, JobStatus.QUEUED)
    assert await handle(handler, {"op": "purge", "older_than": "30d"}) == {"purged": 0}
    assert await handle(handler, {"op": "purge", "older_than": 0}) == {"purged": 1}
    assert await store.get(delivered) is None
    assert await store.get(queued) is not None


@pytest.mark.parametrize(
    ("verb", "request_"),
    [
        ("enqueue", SMS),
        ("get", {"op": "status", "id": "x"}),
        ("list_jobs", {"op": "jobs"}),
        ("retry", {"op": "retry", "since": "1h"}),
    ],
)
async def test_unreachable_store_is_unavailable(
    handler: Handler,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    verb: str,
    request_: dict[str, Any],
) -> None:
    async def unreachable(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("disk on fire")

    monkeypatch.setattr(store, verb, unreachable)
    with pytest.raises(Unavailable, match="store unavailable: disk on fire") as raised:
        await handle(handler, request_)
    assert isinstance(raised.value.__cause__, StoreUnavailable)


async def test_suppress_list_and_unsuppress(handler: Handler, store: Store) -> None:
    assert (
        await handle(
            handler,
            {"op": "suppress", "address": "Zhang <Zhang.San@Example.com>", "reason": "asked"},
        )
        == {}
    )
    listed = await handle(handler, {"op": "suppressions"})
    assert [(e["address"], e["reason"]) for e in listed["suppressions"]] == [
        ("zhang.san@example.com", "asked")
    ]
    assert listed["suppressions"][0]["created_at"].endswith("Z")
    assert await store.suppressed({"zhang.san@example.com"})
    unsuppress = {"op": "unsuppress", "address": "zhang.san@example.com"}
    assert await handle(handler, unsuppress) == {"removed": True}
    assert await handle(handler, unsuppress) == {"removed": False}


@pytest.mark.parametrize("address", ["", "not an address", 42])
async def test_suppress_needs_an_address(handler: Handler, address: object) -> None:
    with pytest.raises(InvalidRequest, match="address"):
        await handle(handler, {"op": "suppress", "address": address})


# --- per-token limits on the admin ops that requeue or delete --------------------------------

LIMITED = {
    "retry": {"op": "retry", "since": "1h"},
    "purge": {"op": "purge", "older_than": "30d"},
    "unsuppress": {"op": "unsuppress", "address": "a@example.com"},
}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def limited(handler: Handler, store: Store, clock: Clock) -> Handler:
    """The handler with at most 2 requeues or deletes per token per minute."""
    return Handler(
        intake=handler.intake,
        store=store,
        admin_limit=AdminLimit(RecipientLimit(2, 60.0), clock=clock),
    )


async def test_admin_ops_over_a_tokens_limit_are_rate_limited_and_do_nothing(
    limited: Handler, store: Store, clock: Clock
) -> None:
    assert set(LIMITED) == LIMITED_OPS
    suppress = parse_request({"op": "suppress", "address": "a@example.com"})
    for op, request in LIMITED.items():
        token = f"token {op}"
        await limited.handle(parse_request(request), caller=token)
        await limited.handle(parse_request(request), caller=token)
        await limited.handle(suppress, caller=token)
        with pytest.raises(RateLimited, match=rf"^{op}: {token} went over 2/60s") as refused:
            limited.handle(parse_request(request), caller=token)
        assert "try again in 30s" in refused.value.message
    assert await store.suppressed({"a@example.com"}), "the refused unsuppress did nothing"


async def test_admin_limit_is_per_token_and_refills(
    limited: Handler, store: Store, clock: Clock
) -> None:
    failed = await job_in(limited, store, JobStatus.FAILED)
    retry = parse_request({"op": "retry", "id": failed})
    for _ in range(2):
        limited.handle(parse_request(LIMITED["purge"]), caller="token 1")
    with pytest.raises(RateLimited):
        limited.handle(retry, caller="token 1")
    assert await limited.handle(retry, caller="token 2") == {"ids": [failed]}
    clock.now += 30
    limited.handle(parse_request(LIMITED["purge"]), caller="token 1")
    with pytest.raises(RateLimited):
        limited.handle(retry, caller="token 1")


async def test_reading_and_sending_are_not_admin_limited(limited: Handler, store: Store) -> None:
    for _ in range(5):
        await limited.handle(parse_request({"op": "jobs"}), caller="token 1")
        await limited.handle(parse_request({"op": "suppressions"}), caller="token 1")
        await limited.handle(parse_request(SMS), caller="token 1")
