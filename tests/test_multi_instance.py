"""Three ``notifier serve`` processes on one PostgreSQL database, as users run them.

Deliveries are counted where they land, one line or request per delivery: the SMS outbox
appends a line per delivery (the email outbox would overwrite a repeat, hiding it), and the
webhook sink records every request.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.http_sink import HTTPSink, Recorded, Reply
from tests.support.postgres import database_name, fetchval, terminate_backends
from tests.support.server import LineConnection, ServerProcess
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

JOBS = 20_000
CHUNK = 500
NUMBER = "+14155550101"

Start = Callable[..., list[ServerProcess]]


@pytest.fixture
def start_instances(postgres_url: str, tmp_path: Path) -> Iterator[Start]:
    """``start(count, **env)``: that many instances on the test database, stopped at the end."""
    started: list[ServerProcess] = []

    def start(count: int, **env: str) -> list[ServerProcess]:
        for _ in range(count):
            home = tmp_path / f"instance-{len(started)}"
            home.mkdir()
            process = ServerProcess(
                home, NOTIFIER_DATABASE_URL=postgres_url, NOTIFIER_LOG_LEVEL="WARNING", **env
            )
            started.append(process.start())
        return started[-count:]

    yield start
    for process in started:
        process.stop()


class OutboxCounter:
    """Counts the lines of the instances' SMS outboxes, reading only what was appended."""

    def __init__(self, instances: list[ServerProcess]) -> None:
        self.files = [instance.outbox / "sms.jsonl" for instance in instances]
        self.offsets = dict.fromkeys(self.files, 0)
        self.counts: Counter[str] = Counter()
        self.lines: Counter[Path] = Counter()

    def refresh(self) -> Counter[str]:
        for path in self.files:
            if not path.exists():
                continue
            with open(path, "rb") as file:
                file.seek(self.offsets[path])
                data = file.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offsets[path] += len(complete)
            lines = complete.splitlines()
            self.lines[path] += len(lines)
            self.counts.update(json.loads(line)["id"] for line in lines)
        return self.counts


async def send_all(instance: ServerProcess, keys: list[str]) -> dict[str, str]:
    """Send a job per key, pipelined; resend (same key) what was answered ``unavailable``.

    Returns key -> job id for every job answered ``ok``.
    """
    accepted: dict[str, str] = {}
    conn = await LineConnection.open(instance.port)
    try:
        while pending := [key for key in keys if key not in accepted]:
            for start in range(0, len(pending), CHUNK):
                chunk = pending[start : start + CHUNK]
                await conn.send(
                    *(
                        {"channel": "sms", "to": NUMBER, "text": "hi", "idempotency_key": k}
                        for k in chunk
                    )
                )
                for key in chunk:
                    answer = await conn.answer(timeout=60)
                    if answer["ok"]:
                        accepted[key] = answer["id"]
                    else:
                        assert answer["error"]["code"] == "unavailable", answer
    finally:
        await conn.close()
    return accepted


async def spread(instances: list[ServerProcess], count: int) -> dict[str, str]:
    """``count`` jobs, dealt round-robin over the instances and sent to them at once."""
    keys = [f"job-{n}" for n in range(count)]
    parts = await asyncio.gather(
        *(send_all(instance, keys[i :: len(instances)]) for i, instance in enumerate(instances))
    )
    return {key: job_id for part in parts for key, job_id in part.items()}


async def settled(url: str, total: int) -> bool:
    """Every job finished and none in flight, so no late delivery can still arrive."""
    done = await fetchval(url, "SELECT count(*) FROM jobs WHERE status = 'delivered'")
    return done == total


async def test_jobs_spread_over_three_instances_are_each_delivered_once(
    start_instances: Start, postgres_url: str
) -> None:
    instances = start_instances(3)
    sink = OutboxCounter(instances)
    accepted = await spread(instances, JOBS)
    assert len(accepted) == JOBS
    await wait_for(lambda: len(sink.refresh()) >= JOBS, timeout=120, what="every delivery")
    await wait_for(lambda: settled(postgres_url, JOBS), timeout=30, what="the queue to settle")
    counts = sink.refresh()
    assert set(counts) == set(accepted.values())
    assert [job for job, n in counts.items() if n != 1] == []
    shares = [sink.lines[path] for path in sink.files]
    assert all(shares), f"every instance delivers a share: {shares}"


class HoldingGateway:
    """A webhook SMS gateway that answers at once, except that it never answers the requests
    of one sender: that instance's deliveries stay in flight until it dies."""

    def __init__(self, sink: HTTPSink, held_sender: str) -> None:
        self.held_sender = held_sender
        self.release = threading.Event()
        sink.respond_with(self)

    def __call__(self, request: Recorded) -> Reply:
        if request.json()["from"] == self.held_sender:
            self.release.wait()
            return Reply(503)
        return Reply(200)


def requested(sink: HTTPSink, *, held_sender: str, held: bool) -> Counter[str]:
    """Job ids of the requests that the held sender made (``held``), or the others made."""
    bodies = [request.json() for request in list(sink.requests)]
    return Counter(b["id"] for b in bodies if (b["from"] == held_sender) is held)


async def test_work_of_a_killed_instance_is_delivered_by_the_others_within_15s(
    start_instances: Start, http_sink: HTTPSink, postgres_url: str
) -> None:
    gateway = HoldingGateway(http_sink, held_sender="victim")
    env = {
        "NOTIFIER_SMS_PROVIDER": "webhook",
        "NOTIFIER_SMS_URL": http_sink.url,
        "NOTIFIER_SMS_TIMEOUT": "300",
        "NOTIFIER_DELIVERY_TIMEOUT": "300",
        # The sink closes idle keep-alive connections, so a first request after a pause may
        # fail and be retried: retry at once, as the takeover is what is measured here.
        "NOTIFIER_RETRY_BASE_DELAY": "0.05",
        "NOTIFIER_RETRY_MAX_DELAY": "0.2",
    }

    def held() -> set[str]:
        return set(requested(http_sink, held_sender="victim", held=True))

    def delivered() -> Counter[str]:
        return requested(http_sink, held_sender="victim", held=False)

    try:
        victim = start_instances(1, NOTIFIER_SMS_FROM="victim", **env)[0]
        others = start_instances(2, NOTIFIER_SMS_FROM="other", **env)
        ids = set((await spread([victim, *others], 2_000)).values())
        await wait_for(
            lambda: held() and set(delivered()) >= ids - held(),
            timeout=60,
            what="all but the victim's deliveries in flight to be made",
        )
        victim.kill()
        await wait_for(
            lambda: set(delivered()) >= ids,
            timeout=15,
            what="the killed instance's deliveries to be made by the others",
        )
    finally:
        gateway.release.set()
    counts = delivered()
    assert [job for job in ids if counts[job] != 1] == []
    await wait_for(lambda: settled(postgres_url, len(ids)), what="the queue to settle")


async def test_killing_database_connections_loses_no_accepted_job(
    start_instances: Start, postgres_admin_url: str, postgres_url: str
) -> None:
    instances = start_instances(3)
    sink = OutboxCounter(instances)
    kills = 0

    async def kill_connections_while_sending() -> None:
        nonlocal kills
        database = database_name(postgres_url)
        while kills < 5:
            next_kill = len(sink.refresh()) + 500
            await wait_for(lambda: len(sink.refresh()) > next_kill, timeout=60)  # noqa: B023
            kills += bool(await terminate_backends(postgres_admin_url, database))

    killer = asyncio.create_task(kill_connections_while_sending())
    accepted = await spread(instances, 6_000)
    await killer
    assert kills == 5
    await wait_for(lambda: len(sink.refresh()) >= len(accepted), timeout=60, what="deliveries")
    await wait_for(lambda: settled(postgres_url, len(accepted)), what="the queue to settle")
    counts = sink.refresh()
    assert set(counts) == set(accepted.values())
    assert [job for job, n in counts.items() if n != 1] == []


async def test_each_callback_event_is_posted_once_across_three_instances(
    start_instances: Start, http_sink: HTTPSink, postgres_url: str
) -> None:
    instances = start_instances(
        3, NOTIFIER_CALLBACK_URL=http_sink.url + "/hooks", NOTIFIER_CALLBACK_CONCURRENCY="16"
    )
    accepted = await spread(instances, 3_000)

    def finals() -> Counter[str]:
        return Counter(r.json()["job"]["id"] for r in list(http_sink.requests))

    await wait_for(
        lambda: len(finals()) >= len(accepted), timeout=120, what="a job.final for every job"
    )
    events = Counter(r.json()["event_id"] for r in list(http_sink.requests))
    assert set(finals()) == set(accepted.values())
    assert [job for job, n in finals().items() if n != 1] == [], "one job.final per job"
    assert [event for event, n in events.items() if n != 1] == [], "each event posted once"
