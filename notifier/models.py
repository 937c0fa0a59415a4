"""The data that moves between intake, store, dispatcher and channels.

Plain frozen dataclasses: the store persists them, the dispatcher hands ``Message`` to a
channel and gets a ``Receipt`` back. Nothing here knows about a backend or a provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


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
