"""The data that moves between intake, store, dispatcher and channels.

Plain frozen dataclasses: the store persists them, the dispatcher hands ``Message`` to a
channel and gets a ``Receipt`` back. Nothing here knows about a backend or a provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parseaddr
from enum import StrEnum
from typing import Any, Literal


class JobStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.DELIVERED, JobStatus.FAILED, JobStatus.CANCELLED})


class Priority(StrEnum):
    """Claimed in this order within a channel; stored as ``rank`` so an index can order it."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    @classmethod
    def of_rank(cls, rank: int) -> Priority:
        return _BY_RANK[rank]


_RANKS = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
_BY_RANK = {rank: priority for priority, rank in _RANKS.items()}


class CallbackState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class ReceiptState(StrEnum):
    """What became of a message after the provider accepted it."""

    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    BOUNCED = "bounced"


def bare_address(mailbox: str) -> str:
    """The address of ``Name <addr>`` alone, lower-cased: how suppressions and bounces
    name an email recipient, whatever display name or case the job gave it."""
    return parseaddr(mailbox)[1].lower()


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, the form every answer uses."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Message:
    """A fully rendered message, as stored at intake and handed to a channel.

    ``skip`` names the recipients (as the job spells them) already served by an earlier
    attempt: a channel delivers to the others only, while headers stay as they were.
    """

    id: str
    channel: str
    to: tuple[str, ...]
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    message_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    skip: tuple[str, ...] = ()

    @property
    def pending_to(self) -> tuple[str, ...]:
        return tuple(r for r in self.to if r not in self.skip)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"to": list(self.to)}
        for name in ("subject", "text", "html", "message_id"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        for name in ("cc", "bcc", "reply_to"):
            value = getattr(self, name)
            if value:
                data[name] = list(value)
        if self.extra:
            data["extra"] = self.extra
        return data

    @classmethod
    def from_dict(cls, id: str, channel: str, data: dict[str, Any]) -> Message:
        return cls(
            id=id,
            channel=channel,
            to=tuple(data["to"]),
            subject=data.get("subject"),
            text=data.get("text"),
            html=data.get("html"),
            cc=tuple(data.get("cc", ())),
            bcc=tuple(data.get("bcc", ())),
            reply_to=tuple(data.get("reply_to", ())),
            message_id=data.get("message_id"),
            extra=data.get("extra", {}),
        )


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a channel reports after delivering: provider ids per recipient, where it has them."""

    provider_ids: dict[str, str | None] = field(default_factory=dict)
    provider_message_id: str | None = None
    #: Recipients refused for good while others got the message, with the reason.
    refused: dict[str, str] = field(default_factory=dict)
    #: Which provider delivered each recipient, where a channel has several.
    providers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated, rendered send request on its way into the store."""

    message: Message
    idempotency_key: str | None = None
    run_at: datetime | None = None
    priority: Priority = Priority.NORMAL
    #: Jobs with the same value supersede each other (channel, collapse_key and recipients).
    collapse: str | None = None
    callback_url: str | None = None


@dataclass(frozen=True, slots=True)
class Enqueued:
    id: str
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Job:
    """A job as the store holds it."""

    id: str
    channel: str
    status: JobStatus
    message: Message
    attempts: int
    created_at: datetime
    updated_at: datetime
    run_at: datetime
    last_error: str | None = None
    idempotency_key: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    priority: Priority = Priority.NORMAL
    superseded_by: str | None = None
    receipts: dict[str, Any] = field(default_factory=dict)
    #: The state of the job's latest callback event, while a callback is configured.
    callback: dict[str, Any] | None = None

    def pending_message(self) -> Message:
        """The message, marked with the recipients an earlier attempt already served."""
        done = self.results.get("delivered", {})
        return replace(self.message, skip=tuple(done)) if done else self.message

    def to_status(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "id": self.id,
            "channel": self.channel,
            "status": self.status.value,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
            "run_at": isoformat(self.run_at),
        }
        if self.results:
            answer["results"] = self.results
        if "segments" in self.message.extra:
            answer["segments"] = self.message.extra["segments"]
        answer["priority"] = self.priority.value
        if self.superseded_by is not None:
            answer["superseded_by"] = self.superseded_by
        if self.receipts:
            answer["receipts"] = self.receipts
        if self.callback is not None:
            answer["callback"] = self.callback
        return answer


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one delivery attempt, recorded by the store in one batch with others.

    ``status`` is DELIVERED, RETRYING (with ``run_at``) or FAILED. ``results`` replaces the
    job's stored per-recipient results.
    """

    job_id: str
    status: JobStatus
    last_error: str | None = None
    run_at: datetime | None = None
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event:
    """A callback event as claimed from the store's outbox, with its job as it now stands."""

    id: str
    type: str
    url: str
    created_at: datetime
    attempts: int
    job: Job


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """The result of one POST of an event: PENDING again (with ``run_at``), SENT or FAILED."""

    event_id: str
    state: CallbackState
    last_error: str | None = None
    run_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ReceiptReport:
    """A provider's word on one recipient after it accepted the message (a DLR or a bounce).

    ``reference`` finds the job: a provider message id (``by="provider_id"``), the job id
    (``"job_id"``: the webhook gateway and email bounces, by Message-ID). ``recipient`` is as
    the provider spells it; the store matches it to the job's spelling.
    """

    reference: str
    by: Literal["provider_id", "job_id"]
    recipient: str | None
    state: ReceiptState
    reason: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class Suppression:
    address: str
    reason: str
    created_at: datetime

    def to_answer(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "reason": self.reason,
            "created_at": isoformat(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class JobSearch:
    """A dashboard search: every criterion given must hold; newest first, ``limit`` at most.

    ``recipient`` is the job's first ``to`` recipient as the job spells it, in any case (an
    expression index holds it); the time range is on ``created_at``.
    """

    job_id: str | None = None
    recipient: str | None = None
    idempotency_key: str | None = None
    status: JobStatus | None = None
    created_from: datetime | None = None
    created_until: datetime | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True)
class MinuteOutcomes:
    """Jobs that finished delivered or failed in the minute starting at ``minute``."""

    minute: datetime
    delivered: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class CallbackBacklog:
    """Callback events still to be posted, and when the oldest of them was written."""

    pending: int
    oldest: datetime | None
