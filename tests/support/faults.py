"""Seeded fault injection for the sinks, and the ledger of what each sink took.

A ``FaultPlan`` decides, attempt by attempt, what a provider does to a delivery: the SMTP
relay answers DATA with ``451`` or ``550`` or drops the connection before answering; the
SMS gateway answers ``500`` or ``429`` or holds its answer past the client's timeout; the
callback receiver answers ``500``. Each sink draws from its own seeded stream, so the rates
are those of the plan in every run (the order depends on timing, the shares do not).

Every delivery a sink sees goes into the ``Ledger`` with what became of it, so a test can
tell a duplicate that is explained (the provider took the message but its answer was lost:
a drop after DATA, a gateway timeout) from one that is not::

    plan = FaultPlan(seed=15)                       # the rates of issue 15
    ledger = Ledger()
    smtp = FaultySMTPSink(plan=plan, ledger=ledger)  # running_smtp_sink(..., sink=smtp)
    http_sink.respond_with(faulty_gateway(plan, ledger))
"""

from __future__ import annotations

import random
import re
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import StrEnum

from aiosmtpd.smtp import SMTP, Envelope, Session

from notifier.channels.mime import job_id_of
from tests.support.http_sink import DROP, Recorded, Reply, Responder
from tests.support.smtp import SMTPSink


class Took(StrEnum):
    """What became of one delivery at the provider."""

    #: Taken and answered: the sender knows.
    OK = "ok"
    #: Taken, but the answer never reached the sender (drop after DATA, gateway timeout).
    LOST = "lost"
    #: Refused for now (451, HTTP 500/429): not taken, the sender retries.
    REFUSED = "refused"
    #: Refused for good (550): not taken, the job fails.
    PERMANENT = "permanent"


#: What the provider took, whether or not the sender heard of it.
TAKEN = (Took.OK, Took.LOST)


@dataclass(frozen=True)
class FaultPlan:
    """The share of attempts each fault hits (the defaults are issue 15's) and the seed."""

    seed: int = 15
    smtp_451: float = 0.10
    smtp_550: float = 0.02
    smtp_drop: float = 0.02
    gateway_500: float = 0.05
    gateway_429: float = 0.03
    gateway_timeout: float = 0.01
    callback_500: float = 0.10

    @classmethod
    def none(cls, seed: int = 15) -> FaultPlan:
        """Every provider answers at once and takes everything."""
        return cls(seed, 0, 0, 0, 0, 0, 0, 0)

    def stream(self, name: str) -> Draw:
        """A seeded draw for one sink: ``draw(shares)`` picks a fault or ``None``."""
        return Draw(random.Random(f"{self.seed}-{name}"))


@dataclass
class Draw:
    rng: random.Random
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, shares: dict[str, float]) -> str | None:
        with self.lock:
            roll = self.rng.random()
        for fault, share in shares.items():
            if roll < share:
                return fault
            roll -= share
        return None


@dataclass(frozen=True)
class Arrival:
    job: str
    channel: str
    sender: str
    took: Took


class Ledger:
    """Every delivery the sinks saw, by job, safe to add to from the sinks' threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrivals: dict[str, list[Arrival]] = defaultdict(list)
        self._settled: set[str] = set()

    def add(self, job: str, channel: str, sender: str, took: Took) -> None:
        with self._lock:
            self._arrivals[job].append(Arrival(job, channel, sender, took))
            if took is not Took.REFUSED:
                self._settled.add(job)

    def settled(self) -> set[str]:
        """The jobs the providers took at least once, or refused for good: those that need
        no further delivery."""
        with self._lock:
            return set(self._settled)

    def of(self, job: str) -> list[Arrival]:
        with self._lock:
            return list(self._arrivals.get(job, ()))

    def counts(self) -> Counter[Took]:
        with self._lock:
            return Counter(a.took for seen in self._arrivals.values() for a in seen)


def copies(arrivals: list[Arrival]) -> int:
    """How many copies of the job the providers took."""
    return sum(a.took in TAKEN for a in arrivals)


_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


@dataclass
class FaultySMTPSink(SMTPSink):
    """The test SMTP sink answering DATA as the plan says; each DATA goes into the ledger
    under the job its ``Message-ID`` names and its envelope sender."""

    plan: FaultPlan = field(default_factory=FaultPlan)
    ledger: Ledger = field(default_factory=Ledger)

    def __post_init__(self) -> None:
        self._draw = self.plan.stream("smtp")
        self._shares = {
            "451": self.plan.smtp_451,
            "550": self.plan.smtp_550,
            "drop": self.plan.smtp_drop,
        }

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes) and envelope.mail_from is not None
        found = _MESSAGE_ID.search(envelope.content)
        assert found is not None, "notifier always sets a Message-ID"
        job = job_id_of(found.group(1).decode())
        fault = self._draw(self._shares)
        if fault == "451":
            self.ledger.add(job, "email", envelope.mail_from, Took.REFUSED)
            return "451 4.3.0 try again later (fault plan)"
        if fault == "550":
            self.ledger.add(job, "email", envelope.mail_from, Took.PERMANENT)
            return "550 5.1.1 mailbox unavailable (fault plan)"
        if fault == "drop":
            self.ledger.add(job, "email", envelope.mail_from, Took.LOST)
            assert server.transport is not None
            server.transport.close()
            return "421 4.4.2 connection dropped (fault plan)"
        self.ledger.add(job, "email", envelope.mail_from, Took.OK)
        return await super().handle_DATA(server, session, envelope)


def faulty_gateway(plan: FaultPlan, ledger: Ledger, *, hold: float) -> Responder:
    """A webhook SMS gateway (JSON ``{"id", "from", ...}``) answering as the plan says; a
    timeout holds the answer ``hold`` seconds, past the client's timeout, then answers 200
    to no one."""
    draw = plan.stream("gateway")
    shares = {"500": plan.gateway_500, "429": plan.gateway_429, "timeout": plan.gateway_timeout}
    never = threading.Event()

    def respond(request: Recorded) -> Reply:
        try:
            body = request.json()
        except ValueError:  # the sender was killed mid-request: nothing was sent
            return DROP
        fault = draw(shares)
        if fault == "500":
            ledger.add(body["id"], "sms", body["from"], Took.REFUSED)
            return Reply(500, body="fault plan")
        if fault == "429":  # without Retry-After notifier holds the number for a minute
            ledger.add(body["id"], "sms", body["from"], Took.REFUSED)
            return Reply(429, body="fault plan", headers={"Retry-After": "1"})
        if fault == "timeout":
            ledger.add(body["id"], "sms", body["from"], Took.LOST)
            never.wait(hold)
            return Reply(200)
        ledger.add(body["id"], "sms", body["from"], Took.OK)
        return Reply(200)

    return respond


@dataclass(frozen=True)
class Posted:
    event: str
    job: str
    type: str
    status: str
    acked: bool


class CallbackReceiver:
    """An app's callback endpoint answering 500 to the plan's share of posts; records each."""

    def __init__(self, plan: FaultPlan) -> None:
        self._draw = plan.stream("callbacks")
        self._shares = {"500": plan.callback_500}
        self._lock = threading.Lock()
        self.posts: list[Posted] = []
        self._acked: set[str] = set()

    def __call__(self, request: Recorded) -> Reply:
        event = request.json()
        acked = self._draw(self._shares) is None
        posted = Posted(
            event["event_id"], event["job"]["id"], event["type"], event["job"]["status"], acked
        )
        with self._lock:
            self.posts.append(posted)
            if acked and posted.type == "job.final":
                self._acked.add(posted.job)
        return Reply(200) if acked else Reply(500, body="fault plan")

    def acked(self) -> set[str]:
        """The jobs whose job.final the receiver acknowledged."""
        with self._lock:
            return set(self._acked)

    def finals(self) -> dict[str, list[Posted]]:
        """Each job's job.final posts, in order."""
        by_job: dict[str, list[Posted]] = defaultdict(list)
        with self._lock:
            for posted in self.posts:
                if posted.type == "job.final":
                    by_job[posted.job].append(posted)
        return by_job
