"""Chaos runs of issue 15, shared by tests/test_chaos.py (which asserts) and bench.chaos
(which prints): a soak under the fault plan, and kill -9 loops on either store.

Each run drives real ``notifier serve`` processes against the faulty sinks of
``tests.support.faults``, sends every job (resending, with its idempotency key, whatever a
kill left unanswered), waits until every accepted job is final, and returns ``Figures``:
accepted, delivered, failed, lost, duplicated and how many duplicates are explained.

A duplicate is explained when the provider took a copy whose outcome notifier could not
know: its answer was lost (SMTP connection dropped after DATA, gateway timeout), or it was
taken from an instance that was then killed before the delivery was recorded (the store's
delivered jobs are read right after each kill, before anyone takes the work over).
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import trustme

from tests.support.faults import (
    Arrival,
    CallbackReceiver,
    FaultPlan,
    FaultySMTPSink,
    Ledger,
    Posted,
    Took,
    copies,
    faulty_gateway,
)
from tests.support.http_sink import running_http_sink
from tests.support.server import LineConnection, ServerProcess
from tests.support.smtp import running_smtp_sink
from tests.support.waiting import wait_for

CHUNK = 500
#: The client's SMS timeout; a gateway "timeout" holds its answer longer than this.
SMS_TIMEOUT = 5.0
#: Retries converge in seconds, not the defaults' minutes; the circuit reopens quickly, so a
#: run of faults costs a second, not 30.
FAST_RETRIES = {
    "NOTIFIER_RETRY_BASE_DELAY": "0.05",
    "NOTIFIER_RETRY_MAX_DELAY": "0.5",
    "NOTIFIER_RETRY_MAX_ATTEMPTS": "30",
    "NOTIFIER_CIRCUIT_OPEN_SECONDS": "0.5",
    "NOTIFIER_CALLBACK_MAX_ATTEMPTS": "30",
    "NOTIFIER_CALLBACK_CONCURRENCY": "16",
    "NOTIFIER_POLL_INTERVAL": "0.2",
    "NOTIFIER_LOG_LEVEL": "WARNING",
}
FINAL = ("delivered", "failed")


@dataclass
class Figures:
    """A run's outcome, as counts; ``wrong`` names the first jobs that ended badly."""

    name: str
    jobs: int
    accepted: int = 0
    delivered: int = 0
    failed: int = 0
    lost: int = 0
    #: Jobs final for the wrong reason: failed without a 550, or delivered despite one.
    misjudged: int = 0
    duplicated: int = 0
    explained: int = 0
    recovered: int = 0
    kills: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    #: Jobs whose job.final callback was acknowledged exactly once, all posts one event.
    callbacks_once: int | None = None
    seconds: float = 0.0
    wrong: list[str] = field(default_factory=list)

    @property
    def unexplained(self) -> int:
        return self.duplicated - self.explained

    def note(self, problem: str) -> None:
        if len(self.wrong) < 20:
            self.wrong.append(problem)


def jobs(count: int, prefix: str) -> list[dict[str, Any]]:
    """Half email, half SMS, each with its idempotency key."""
    made: list[dict[str, Any]] = []
    for n in range(count):
        key = f"{prefix}-{n}"
        if n % 2:
            job = {"channel": "sms", "to": f"+86138{n:08d}"}
        else:
            job = {"channel": "email", "to": f"u{n}@example.com", "subject": key}
        made.append({**job, "text": key, "idempotency_key": key})
    return made


@dataclass
class Providers:
    """The faulty sinks of one run and the settings that point notifier at them."""

    ledger: Ledger
    receiver: CallbackReceiver | None
    settings: dict[str, str]

    def sender(self, name: str) -> dict[str, str]:
        """Settings naming the sender, so the ledger says which instance took what."""
        return {"NOTIFIER_SMTP_FROM": name, "NOTIFIER_SMS_FROM": name}


@asynccontextmanager
async def providers(
    plan: FaultPlan, ca: trustme.CA, work: Path, *, callbacks: bool
) -> AsyncIterator[Providers]:
    """SMTP over TLS, a webhook SMS gateway and (``callbacks``) the app's receiver."""
    ledger = Ledger()
    ca_file = work / "chaos-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with AsyncExitStack() as stack:
        smtp = await stack.enter_async_context(
            running_smtp_sink("ssl", ca, sink=FaultySMTPSink(plan=plan, ledger=ledger))
        )
        gateway = stack.enter_context(running_http_sink())
        gateway.respond_with(faulty_gateway(plan, ledger, hold=SMS_TIMEOUT * 2))
        settings = {
            **FAST_RETRIES,
            "NOTIFIER_SMTP_HOST": smtp.host,
            "NOTIFIER_SMTP_PORT": str(smtp.port),
            "NOTIFIER_SMTP_SECURITY": "ssl",
            "NOTIFIER_SMTP_CA_FILE": str(ca_file),
            "NOTIFIER_SMS_PROVIDER": "webhook",
            "NOTIFIER_SMS_URL": gateway.url + "/sms",
            "NOTIFIER_SMS_TIMEOUT": str(SMS_TIMEOUT),
        }
        receiver = None
        if callbacks:
            receiver = CallbackReceiver(plan)
            hooks = stack.enter_context(running_http_sink())
            hooks.respond_with(receiver)
            settings["NOTIFIER_CALLBACK_URL"] = hooks.url + "/hooks"
        yield Providers(ledger, receiver, settings)


async def _connect(port: int) -> LineConnection | None:
    try:
        return await LineConnection.open(port)
    except OSError:
        return None


async def _answer(conn: LineConnection) -> dict[str, Any]:
    line = await asyncio.wait_for(conn.reader.readline(), 60)
    if not line:
        raise ConnectionResetError("the service closed the connection")
    answer: dict[str, Any] = json.loads(line)
    return answer


async def send_all(port: int, batch: list[dict[str, Any]], accepted: dict[str, str]) -> None:
    """Send every job, pipelined; resend (same key) what was not answered ``ok``, after a
    reconnect when the instance was killed. ``accepted``: key -> id of each ``ok``."""
    while pending := [job for job in batch if job["idempotency_key"] not in accepted]:
        conn = await wait_for(lambda: _connect(port), timeout=60, what=f"a service on {port}")
        try:
            for start in range(0, len(pending), CHUNK):
                chunk = pending[start : start + CHUNK]
                await conn.send(b"".join(json.dumps(job).encode() + b"\n" for job in chunk))
                for job in chunk:
                    answer = await _answer(conn)
                    if answer["ok"]:
                        first = accepted.setdefault(job["idempotency_key"], answer["id"])
                        assert first == answer["id"], f"a key answered with two ids: {answer}"
                    else:
                        assert answer["error"]["code"] == "unavailable", answer
        except ConnectionError:
            continue
        finally:
            with suppress(ConnectionError):
                await conn.close()


async def statuses(port: int, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The status answer of each job, asked on one pipelined connection."""
    found = {}
    conn = await LineConnection.open(port)
    try:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            await conn.send(*({"op": "status", "id": job_id} for job_id in chunk))
            for job_id in chunk:
                found[job_id] = await _answer(conn)
    finally:
        await conn.close()
    return found


class Finals:
    """The final status of each accepted job, asking only about those not final yet."""

    def __init__(self, accepted: dict[str, str]) -> None:
        self.ids = set(accepted.values())
        self.final: dict[str, dict[str, Any]] = {}

    async def all_final(self, port: int, ready: Callable[[set[str]], bool]) -> bool:
        """Whether every job is final; asks the service only once ``ready(open ids)``."""
        open_ids = self.ids - set(self.final)
        if not ready(open_ids):
            return False
        for job_id, answer in (await statuses(port, sorted(open_ids))).items():
            if answer.get("status") in FINAL:
                self.final[job_id] = answer
        return len(self.final) == len(self.ids)


async def delivered_ids(database_url: str) -> set[str]:
    """The jobs the store has recorded as delivered, read directly (the instance is dead)."""
    query = "SELECT id FROM jobs WHERE status = 'delivered'"
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")

        def read() -> set[str]:
            with closing(sqlite3.connect(path)) as db:
                return {row[0] for row in db.execute(query)}

        return await asyncio.to_thread(read)
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return {row["id"] for row in await conn.fetch(query)}
    finally:
        await conn.close()


@dataclass
class Kill:
    """One kill -9: the sender name of the incarnation killed and what the store had done."""

    sender: str
    delivered: set[str]


def tally(
    figures: Figures,
    accepted: dict[str, str],
    finals: Finals,
    ledger: Ledger,
    kills: list[Kill],
    receiver: CallbackReceiver | None,
) -> Figures:
    """Count outcomes, checking each job ended as its deliveries say it must."""
    figures.accepted = len(accepted)
    figures.kills = len(kills)
    figures.faults = {took.value: n for took, n in ledger.counts().items() if took is not Took.OK}
    for job_id in accepted.values():
        _tally_job(figures, job_id, finals.final.get(job_id), ledger, kills)
    if receiver is not None:
        finals_posted = receiver.finals()
        figures.callbacks_once = sum(
            _one_final(finals_posted.get(job_id, []), figures) for job_id in accepted.values()
        )
    return figures


def _tally_job(
    figures: Figures, job_id: str, answer: dict[str, Any] | None, ledger: Ledger, kills: list[Kill]
) -> None:
    seen = ledger.of(job_id)
    taken = copies(seen)
    status = answer["status"] if answer else "not final"
    refused = any(a.took is Took.PERMANENT for a in seen)
    if status not in FINAL or (status == "delivered" and not taken):
        figures.lost += 1
        figures.note(f"{job_id} lost: {status}, {taken} copies taken, {answer}")
        return
    assert answer is not None
    figures.delivered += status == "delivered"
    figures.failed += status == "failed"
    figures.recovered += status == "delivered" and answer["attempts"] > 1
    failed_for_550 = status == "failed" and "550" in (answer["last_error"] or "")
    if not (failed_for_550 if refused else status == "delivered"):
        figures.misjudged += 1
        figures.note(f"{job_id} {status}, yet 550 answered: {refused}: {answer}")
    duplicates = max(0, taken - 1)
    unknown = sum(_outcome_unknown(a, job_id, kills) for a in seen)
    figures.duplicated += duplicates
    figures.explained += min(duplicates, unknown)
    if duplicates > unknown:
        figures.note(f"{job_id}: unexplained duplicate: {seen}")


def _outcome_unknown(arrival: Arrival, job_id: str, kills: list[Kill]) -> bool:
    """Whether notifier could not know the provider took this copy: its answer was lost,
    or the instance that sent it was killed before recording the delivery."""
    if arrival.took is Took.LOST:
        return True
    return arrival.took is Took.OK and any(
        arrival.sender == kill.sender and job_id not in kill.delivered for kill in kills
    )


def _one_final(posts: list[Posted], figures: Figures) -> bool:
    """One job.final event, acknowledged once, saying the job's final status."""
    once = len({p.event for p in posts}) == 1 and sum(p.acked for p in posts) == 1
    if not once:
        figures.note(f"job.final posts: {posts}")
    return once


def _instance(home: Path, sinks: Providers, database_url: str | None, sender: str) -> ServerProcess:
    home.mkdir(parents=True, exist_ok=True)
    env = {**sinks.settings, **sinks.sender(sender)}
    if database_url is not None:
        env["NOTIFIER_DATABASE_URL"] = database_url
    return ServerProcess(home, **env)


async def _settle(figures: Figures, condition: Callable[[], Any], timeout: float) -> None:
    """Wait until every job is final; past ``timeout`` the open ones count as lost."""
    try:
        await wait_for(condition, timeout=timeout, what="every accepted job to be final")
    except AssertionError as exc:
        figures.note(str(exc))


async def soak(
    work: Path,
    ca: trustme.CA,
    *,
    database_url: str | None = None,
    count: int = 20_000,
    plan: FaultPlan | None = None,
    name: str = "soak",
    timeout: float = 240.0,
) -> Figures:
    """``count`` jobs, half email and half SMS, callbacks on, every provider faulty."""
    started = time.monotonic()
    figures = Figures(name, count)
    async with providers(plan or FaultPlan(), ca, work, callbacks=True) as sinks:
        receiver = sinks.receiver
        assert receiver is not None
        instance = _instance(work / "soak", sinks, database_url, "soak@chaos.test")
        await asyncio.to_thread(instance.start, 60)
        try:
            accepted: dict[str, str] = {}
            await send_all(instance.port, jobs(count, name), accepted)
            finals = Finals(accepted)
            await _settle(
                figures,
                lambda: finals.all_final(instance.port, lambda open: open <= receiver.acked()),
                timeout,
            )
        finally:
            await asyncio.to_thread(instance.stop)
    figures.seconds = time.monotonic() - started
    return tally(figures, accepted, finals, sinks.ledger, [], receiver)


async def kill_loop(
    work: Path,
    ca: trustme.CA,
    *,
    database_url: str | None = None,
    instances: int = 1,
    count: int = 10_000,
    kills: int = 5,
    seed: int = 15,
    name: str = "kill loop",
    timeout: float = 180.0,
) -> Figures:
    """``count`` jobs over ``instances`` instances; the first is killed -9 ``kills`` times at
    seeded points of the run (accepted plus delivered jobs) and restarted each time."""
    started = time.monotonic()
    figures = Figures(name, count)
    points = sorted(random.Random(seed).sample(range(count // 10, 2 * count - count // 10), kills))
    async with providers(FaultPlan.none(seed), ca, work, callbacks=False) as sinks:
        victim = _instance(work / "victim", sinks, database_url, "victim-0@chaos.test")
        steady = [
            _instance(work / f"steady-{n}", sinks, database_url, f"steady-{n}@chaos.test")
            for n in range(1, instances)
        ]
        everyone = [victim, *steady]
        killed: list[Kill] = []
        try:
            for instance in everyone:
                await asyncio.to_thread(instance.start, 60)
            accepted: dict[str, str] = {}

            def progress() -> int:
                return len(accepted) + len(sinks.ledger.settled())

            killer = asyncio.create_task(_kill_at(points, victim, progress, sinks, killed, figures))
            batch = jobs(count, name.replace(" ", "-"))
            await asyncio.gather(
                *(
                    send_all(instance.port, batch[n :: len(everyone)], accepted)
                    for n, instance in enumerate(everyone)
                )
            )
            await killer
            finals = Finals(accepted)
            await _settle(
                figures,
                lambda: finals.all_final(victim.port, lambda open: open <= sinks.ledger.settled()),
                timeout,
            )
        finally:
            for instance in everyone:
                await asyncio.to_thread(instance.stop)
    figures.seconds = time.monotonic() - started
    return tally(figures, accepted, finals, sinks.ledger, killed, None)


async def _kill_at(
    points: list[int],
    victim: ServerProcess,
    progress: Callable[[], int],
    sinks: Providers,
    killed: list[Kill],
    figures: Figures,
) -> None:
    """At each point, kill -9 the victim, read what its store recorded, restart it under a
    new sender name (so the ledger tells its incarnations apart). A run that stops short of
    a point (jobs lost) ends the kills; the tally then shows fewer."""
    for point in points:
        try:
            await wait_for(lambda: progress() >= point, timeout=120, what=f"progress {point}")  # noqa: B023
        except AssertionError as exc:
            figures.note(str(exc))
            return
        await asyncio.to_thread(victim.kill)
        sender = victim.env["NOTIFIER_SMTP_FROM"]
        killed.append(Kill(sender, await delivered_ids(victim.env["NOTIFIER_DATABASE_URL"])))
        victim.env.update(sinks.sender(f"victim-{len(killed)}@chaos.test"))
        await asyncio.to_thread(victim.start, 60)
