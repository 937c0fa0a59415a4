"""Delivery, retries and shutdown, with the real SQLite store and scripted channels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from notifier.backoff import Backoff
from notifier.channels.base import Channel
from notifier.dispatcher import Dispatcher
from notifier.errors import (
    DeliveryError,
    PermanentDeliveryError,
    RecipientThrottled,
    TransientDeliveryError,
)
from notifier.metrics import Metrics
from notifier.models import Job, JobStatus, Message, NewJob, Priority, Receipt, utcnow
from notifier.settings import RecipientLimit
from notifier.store import Store, open_store
from tests.support.http_sink import HTTPSink, ihuyi_gateway
from tests.support.server import LineConnection, isolated_settings, running_server
from tests.support.waiting import wait_for

Script = Callable[[Message, int], Receipt]


class ScriptedChannel(Channel):
    """A channel whose n-th call does what the test says; it records every message."""

    provider = "scripted"

    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls: list[Message] = []
        self.gate: asyncio.Event | None = None

    async def send(self, message: Message) -> Receipt:
        self.calls.append(message)
        if self.gate is not None:
            await self.gate.wait()
        return self.script(message, len(self.calls))


def fail_then_deliver(failures: int, error: Callable[[], DeliveryError]) -> Script:
    def script(message: Message, call: int) -> Receipt:
        if call <= failures:
            raise error()
        return Receipt(provider_ids=dict.fromkeys(message.to, f"id-{call}"))

    return script


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(isolated_settings(tmp_path))
    await opened.open()
    yield opened
    await opened.close()


async def enqueue(store: Store, *to: str, channel: str = "sms") -> str:
    message = Message(id=f"job-{len(to)}-{to[0]}", channel=channel, to=to, text="hi")
    [answer] = await store.enqueue([NewJob(message)])
    return answer.id


async def job(store: Store, job_id: str) -> Job:
    found = await store.get(job_id)
    assert found is not None
    return found


def dispatcher(store: Store, channel: Channel, tmp_path: Path, **settings: object) -> Dispatcher:
    values: dict[str, object] = {"retry_base_delay": 0.0, "retry_max_delay": 0.0}
    values.update(settings)
    return Dispatcher(
        store, {"sms": channel}, isolated_settings(tmp_path, **values), metrics=Metrics()
    )


async def test_transient_failures_are_retried_until_delivered(store: Store, tmp_path: Path) -> None:
    channel = ScriptedChannel(fail_then_deliver(2, lambda: TransientDeliveryError("busy")))
    job_id = await enqueue(store, "+14155550101")
    await dispatcher(store, channel, tmp_path).run_burst()
    done = await job(store, job_id)
    assert done.status is JobStatus.DELIVERED
    assert done.attempts == 3 and len(channel.calls) == 3
    assert done.last_error is None
    assert done.results["delivered"] == {"+14155550101": "id-3"}


async def test_permanent_failure_fails_at_once(store: Store, tmp_path: Path) -> None:
    channel = ScriptedChannel(fail_then_deliver(9, lambda: PermanentDeliveryError("bad number")))
    job_id = await enqueue(store, "+14155550101")
    await dispatcher(store, channel, tmp_path).run_burst()
    failed = await job(store, job_id)
    assert failed.status is JobStatus.FAILED
    assert failed.attempts == 1 and failed.last_error == "bad number"


async def test_gives_up_after_max_attempts(store: Store, tmp_path: Path) -> None:
    channel = ScriptedChannel(fail_then_deliver(99, lambda: TransientDeliveryError("timeout")))
    job_id = await enqueue(store, "+14155550101")
    await dispatcher(store, channel, tmp_path, retry_max_attempts=4).run_burst()
    failed = await job(store, job_id)
    assert failed.status is JobStatus.FAILED and failed.attempts == 4
    assert failed.last_error == "gave up after 4 attempts: timeout"


async def test_unexpected_channel_exception_counts_as_transient(
    store: Store, tmp_path: Path
) -> None:
    def script(message: Message, call: int) -> Receipt:
        if call == 1:
            raise KeyError("oops")
        return Receipt()

    job_id = await enqueue(store, "+14155550101")
    await dispatcher(store, ScriptedChannel(script), tmp_path).run_burst()
    assert (await job(store, job_id)).status is JobStatus.DELIVERED


async def test_retry_after_is_honoured_beyond_max_delay(store: Store, tmp_path: Path) -> None:
    channel = ScriptedChannel(
        fail_then_deliver(1, lambda: TransientDeliveryError("429", retry_after=3600))
    )
    job_id = await enqueue(store, "+14155550101")
    before = utcnow()
    await dispatcher(store, channel, tmp_path, retry_max_delay=1.0).run_burst()
    waiting = await job(store, job_id)
    assert waiting.status is JobStatus.RETRYING
    assert waiting.run_at >= before + timedelta(seconds=3600)
    assert waiting.last_error == "429"


async def test_retry_repeats_only_the_numbers_that_failed(store: Store, tmp_path: Path) -> None:
    def script(message: Message, call: int) -> Receipt:
        if call == 1:
            raise TransientDeliveryError("gateway busy", delivered={"+14155550101": "sent-1"})
        return Receipt(provider_ids=dict.fromkeys(message.pending_to, "sent-2"))

    channel = ScriptedChannel(script)
    job_id = await enqueue(store, "+14155550101", "+14155550102")
    await dispatcher(store, channel, tmp_path).run_burst()
    assert [m.pending_to for m in channel.calls] == [
        ("+14155550101", "+14155550102"),
        ("+14155550102",),
    ]
    assert channel.calls[1].to == ("+14155550101", "+14155550102"), "the message is unchanged"
    done = await job(store, job_id)
    assert done.results["delivered"] == {"+14155550101": "sent-1", "+14155550102": "sent-2"}


async def test_cancel_during_delivery_is_not_overwritten(store: Store, tmp_path: Path) -> None:
    channel = ScriptedChannel(fail_then_deliver(0, lambda: TransientDeliveryError("x")))
    channel.gate = asyncio.Event()
    job_id = await enqueue(store, "+14155550101")
    burst = asyncio.create_task(dispatcher(store, channel, tmp_path).run_burst())
    await wait_for(lambda: channel.calls, what="delivery started")
    await store.cancel(job_id)
    channel.gate.set()
    await burst
    assert (await job(store, job_id)).status is JobStatus.CANCELLED


async def delivery_in_flight(
    store: Store, tmp_path: Path
) -> tuple[ScriptedChannel, str, Dispatcher, asyncio.Task[None]]:
    """A running dispatcher whose one delivery is held until ``channel.gate`` opens."""
    channel = ScriptedChannel(fail_then_deliver(0, lambda: TransientDeliveryError("x")))
    channel.gate = asyncio.Event()
    job_id = await enqueue(store, "+14155550101")
    worker = dispatcher(store, channel, tmp_path)
    running = asyncio.create_task(worker.run())
    await wait_for(lambda: channel.calls, what="delivery started")
    return channel, job_id, worker, running


async def test_shutdown_releases_cut_off_deliveries(store: Store, tmp_path: Path) -> None:
    channel, job_id, worker, running = await delivery_in_flight(store, tmp_path)
    await worker.stop(grace=0.05)
    await running
    released = await job(store, job_id)
    assert released.status is JobStatus.RETRYING
    assert "shutdown" in (released.last_error or "")

    assert channel.gate is not None
    channel.gate.set()
    await dispatcher(store, channel, tmp_path).run_burst()
    assert (await job(store, job_id)).status is JobStatus.DELIVERED


async def test_shutdown_lets_quick_deliveries_finish(store: Store, tmp_path: Path) -> None:
    channel, job_id, worker, running = await delivery_in_flight(store, tmp_path)
    assert channel.gate is not None
    stopping = asyncio.create_task(worker.stop(grace=30))
    channel.gate.set()
    await stopping
    await running
    assert (await job(store, job_id)).status is JobStatus.DELIVERED


async def test_work_left_in_flight_by_a_dead_process_is_taken_back_at_start(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/jobs.db"
    first = open_store(isolated_settings(tmp_path, database_url=url))
    await first.open()
    job_id = await enqueue(first, "+14155550101")
    assert await first.claim("sms", owner="dead", limit=10, lease_seconds=3600)
    await first.close()  # the process "dies": nothing released

    second = open_store(isolated_settings(tmp_path, database_url=url))
    await second.open()
    channel = ScriptedChannel(fail_then_deliver(0, lambda: TransientDeliveryError("x")))
    worker = dispatcher(second, channel, tmp_path)
    running = asyncio.create_task(worker.run())

    async def delivered() -> bool:
        return (await job(second, job_id)).status is JobStatus.DELIVERED

    await wait_for(delivered, what="the dead process's job delivered")
    await worker.stop(grace=1)
    await running
    await second.close()


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    backoff = Backoff(base=1.0, cap=30.0)
    assert 1.0 <= backoff.delay(1) <= 2.0
    assert 4.0 <= backoff.delay(3) <= 5.0
    assert backoff.delay(20) == 30.0
    assert backoff.delay(1, retry_after=120.0) == 120.0


# -- version 1.1: priorities, suppression, pacing ------------------------------------------------


async def enqueue_many(store: Store, count: int, *, priority: Priority, tag: str) -> list[str]:
    jobs = [
        NewJob(
            Message(id=f"{tag}-{i}", channel="sms", to=(f"+1415555{i:04d}",), text="x"),
            priority=priority,
        )
        for i in range(count)
    ]
    return [answer.id for answer in await store.enqueue(jobs)]


def record_order() -> ScriptedChannel:
    return ScriptedChannel(lambda message, call: Receipt())


async def test_high_jobs_overtake_a_backlog_sent_through_a_slow_sink(
    store: Store, tmp_path: Path
) -> None:
    concurrency = 8
    channel = record_order()
    channel.gate = asyncio.Event()
    await enqueue_many(store, 2000, priority=Priority.NORMAL, tag="bulk")
    worker = dispatcher(store, channel, tmp_path, sms_concurrency=concurrency)
    running = asyncio.create_task(worker.run())
    await wait_for(lambda: len(channel.calls) >= concurrency, what="the backlog under way")
    high = set(await enqueue_many(store, 3, priority=Priority.HIGH, tag="urgent"))
    sent_before = len(channel.calls)
    channel.gate.set()  # the sink answers from now on, one slot at a time as slots free up

    def all_high_sent() -> bool:
        return high <= {message.id for message in channel.calls}

    await wait_for(all_high_sent, what="the high jobs sent")
    order = [message.id for message in channel.calls]
    worst = max(order.index(job_id) for job_id in high)
    assert worst - sent_before <= 3 * concurrency, "high work waits for a slot, not the backlog"
    await worker.stop(grace=1)
    await running


async def test_low_work_keeps_a_share_of_slots_under_a_stream_of_high_work(
    store: Store, tmp_path: Path
) -> None:
    await enqueue_many(store, 100, priority=Priority.LOW, tag="low")
    await enqueue_many(store, 800, priority=Priority.HIGH, tag="high")
    channel = record_order()
    await dispatcher(store, channel, tmp_path, sms_concurrency=8).run_burst()
    first = [message.id for message in channel.calls[:160]]
    assert sum(job_id.startswith("low") for job_id in first) >= 160 // 8 - 2
    strict = record_order()
    other = tmp_path / "strict"
    other.mkdir()
    strict_store = open_store(isolated_settings(other))
    await strict_store.open()
    try:
        await enqueue_many(strict_store, 10, priority=Priority.LOW, tag="low")
        await enqueue_many(strict_store, 100, priority=Priority.HIGH, tag="high")
        await dispatcher(strict_store, strict, other, priority_aging_share=0.0).run_burst()
        assert all(m.id.startswith("high") for m in strict.calls[:100]), "0 means strict order"
    finally:
        await strict_store.close()


async def test_suppressed_addresses_are_skipped_and_a_job_with_none_left_fails(
    store: Store, tmp_path: Path
) -> None:
    await store.suppress("gone@example.com", "5.1.1 no such user")
    mixed = Message(
        id="mixed", channel="email", to=("Gone <Gone@example.com>", "here@example.com"), text="x"
    )
    only = Message(id="only", channel="email", to=("gone@example.com",), text="x")
    await store.enqueue([NewJob(mixed), NewJob(only)])
    channel = ScriptedChannel(lambda message, call: Receipt())
    settings = isolated_settings(tmp_path, retry_base_delay=0.0)
    await Dispatcher(store, {"email": channel}, settings, metrics=Metrics()).run_burst()
    assert [m.id for m in channel.calls] == ["mixed"]
    assert channel.calls[0].skip == ("Gone <Gone@example.com>",)
    sent = await job(store, "mixed")
    assert sent.status is JobStatus.DELIVERED
    assert sent.results["refused"] == {"Gone <Gone@example.com>": "suppressed: 5.1.1 no such user"}
    failed = await job(store, "only")
    assert failed.status is JobStatus.FAILED
    assert "suppressed" in (failed.last_error or "")


async def test_pacing_holds_a_job_over_the_limit_without_an_attempt(
    store: Store, tmp_path: Path
) -> None:
    first = await enqueue(store, "+14155550101")
    second = await store.enqueue(
        [NewJob(Message(id="again", channel="sms", to=("+14155550101",), text="x"))]
    )
    channel = record_order()
    worker = dispatcher(store, channel, tmp_path, sms_recipient_limits=(RecipientLimit(1, 3600.0),))
    await worker.run_burst()
    assert [m.id for m in channel.calls] == [first]
    paced = await job(store, second[0].id)
    assert (paced.status, paced.attempts) == (JobStatus.QUEUED, 0)
    assert paced.run_at > utcnow() + timedelta(minutes=59)


async def test_a_too_often_answer_holds_every_job_to_that_number(
    store: Store, tmp_path: Path
) -> None:
    def script(message: Message, call: int) -> Receipt:
        if message.id.startswith("job"):
            raise RecipientThrottled(
                "ihuyi: 4081 too often", recipient="+14155550101", retry_after=600
            )
        return Receipt()

    first = await enqueue(store, "+14155550101")
    channel = ScriptedChannel(script)
    worker = dispatcher(store, channel, tmp_path)
    await worker.run_burst()
    held = await job(store, first)
    assert held.status is JobStatus.RETRYING
    await store.enqueue(
        [
            NewJob(Message(id="other-job", channel="sms", to=("+14155550101",), text="x")),
            NewJob(Message(id="other-number", channel="sms", to=("+14155550102",), text="x")),
        ]
    )
    await worker.run_burst()
    assert [m.id for m in channel.calls] == [first, "other-number"]
    waiting = await job(store, "other-job")
    assert waiting.status is JobStatus.QUEUED and waiting.attempts == 0
    assert waiting.run_at > utcnow() + timedelta(minutes=9)


async def test_a_4081_from_a_real_ihuyi_gateway_holds_the_next_job_to_that_number(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    http_sink.respond_with(ihuyi_gateway(codes={"13800138000": 4081}))
    gateway = {
        "sms_provider": "ihuyi",
        "sms_url": http_sink.url + "/sms?method=Submit",
        "sms_account": "C0000001",
        "sms_api_key": "k" * 32,
    }
    async with running_server(tmp_path, **gateway) as server:
        conn = await LineConnection.open(server.port)
        sms = {"channel": "sms", "to": "+8613800138000", "text": "code 1"}
        first = await conn.request(sms)

        async def throttled() -> bool:
            return (await conn.status(first["id"]))["status"] == "retrying"

        await wait_for(throttled, what="the first job answered 4081")
        second = await conn.request({**sms, "text": "code 2"})
        other = await conn.request({**sms, "to": "+8613900139000"})

        async def other_delivered() -> bool:
            return (await conn.status(other["id"]))["status"] == "delivered"

        await wait_for(other_delivered, what="a job to another number delivered")
        held = await conn.status(second["id"])
        assert (held["status"], held["attempts"]) == ("queued", 0)
        assert held["run_at"] > held["created_at"]
        mobiles = [request.form()["mobile"] for request in http_sink.requests]
        assert mobiles.count("13800138000") == 1, "the held number was not tried again"
        await conn.close()
