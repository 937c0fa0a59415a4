"""From a validated ``send`` request to a stored job.

Per-channel rules (addresses, phone numbers, required parts, what the channel's provider
accepts: its ``checks``) and template rendering happen here, before anything is stored, so
every refusal reaches the sender in its answer. Jobs accepted together are committed
together (group commit, see ``batching``).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence

from notifier.batching import Batcher
from notifier.channels.mime import new_message_id
from notifier.channels.sms.segments import count_segments
from notifier.errors import InvalidRequest, UnknownChannel
from notifier.metrics import Metrics
from notifier.models import Enqueued, Message, NewJob, bare_address
from notifier.protocol import SendRequest, check_header_value, check_mailbox, check_phone
from notifier.store import Store
from notifier.templates import Rendered, Templates

EMAIL_ONLY = ("subject", "html", "cc", "bcc", "reply_to")
_NOTHING_RENDERED = Rendered()


def new_job_id() -> str:
    """128 random bits as 32 hex digits; not a secret, so the fast generator will do."""
    return f"{random.getrandbits(128):032x}"


def collapse(message: Message, key: str) -> str:
    """One value for a channel, a collapse key and a set of recipients, in whatever order
    or spelling of display names they came."""
    everyone = (*message.to, *message.cc, *message.bcc)
    recipients = sorted({bare_address(r) if "@" in r else r for r in everyone})
    digest = hashlib.sha256("\0".join([message.channel, key, *recipients]).encode())
    return digest.hexdigest()


def _unique(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _mailboxes(values: Sequence[str], field: str) -> tuple[str, ...]:
    """Checked and without repeats; most sends have no cc, bcc or reply_to, so none costs
    nothing."""
    return _unique([check_mailbox(v, field) for v in values]) if values else ()


class Intake:
    def __init__(
        self,
        store: Store,
        *,
        channels: Collection[str],
        templates: Templates,
        sender: str,
        metrics: Metrics,
        checks: Mapping[str, Callable[[Message], None]] | None = None,
        callback_url: str | None = None,
        max_batch: int = 1000,
    ) -> None:
        """``checks`` maps a channel to what refuses a message its provider would not take
        (``SMSChannel.check``), raising ``InvalidRequest``."""
        self.store = store
        self.callback_url = callback_url
        self.channels = channels
        self.checks = dict(checks or {})
        self.templates = templates
        self.sender = sender
        self.metrics = metrics
        self._batcher: Batcher[NewJob, Enqueued] = Batcher(self._enqueue, max_size=max_batch)
        self._builders: dict[str, Callable[[str, SendRequest, Rendered], Message]] = {
            "email": self._email,
            "sms": _sms,
        }

    def put(self, request: SendRequest) -> asyncio.Future[Enqueued]:
        """Validate and render ``request`` now (raising NotifierError); the future resolves
        once its job is committed."""
        started = time.monotonic()
        future = self._batcher.put(self.prepare(request))
        future.add_done_callback(
            lambda _: self.metrics.intake_seconds.observe(time.monotonic() - started)
        )
        return future

    async def _enqueue(self, jobs: Sequence[NewJob]) -> list[Enqueued]:
        answers = await self.store.enqueue(jobs)
        counts = Counter(
            (answer.duplicate, job.message.channel)
            for job, answer in zip(jobs, answers, strict=True)
        )
        for (duplicate, channel), count in counts.items():
            counter = self.metrics.duplicates if duplicate else self.metrics.accepted
            counter.labels(channel).inc(count)
        return answers

    async def drain(self) -> None:
        await self._batcher.drain()

    def prepare(self, request: SendRequest) -> NewJob:
        if request.channel not in self.channels:
            known = ", ".join(sorted(self.channels))
            raise UnknownChannel(f"channel: unknown channel {request.channel!r} (known: {known})")
        if not request.to:
            raise InvalidRequest("to: at least one recipient is required")
        rendered = _NOTHING_RENDERED
        if request.template is not None:
            rendered = self.templates.render(request.template, request.channel, request.data)
        build = self._builders.get(request.channel, _other)
        message = build(new_job_id(), request, rendered)
        if request.channel in self.checks:
            self.checks[request.channel](message)
        return NewJob(
            message=message,
            idempotency_key=request.idempotency_key,
            run_at=request.send_at,
            priority=request.priority,
            collapse=None
            if request.collapse_key is None
            else collapse(message, request.collapse_key),
            callback_url=request.callback_url or self.callback_url,
        )

    def _email(self, job_id: str, request: SendRequest, rendered: Rendered) -> Message:
        subject = request.subject if request.subject is not None else rendered.subject
        text = request.text if request.text is not None else rendered.text
        html = request.html if request.html is not None else rendered.html
        if not subject:
            raise InvalidRequest("subject: required for email (give it, or a template that does)")
        if text is None and html is None:
            raise InvalidRequest("text: email needs a text or html body")
        return Message(
            id=job_id,
            channel="email",
            to=_mailboxes(request.to, "to"),
            subject=check_header_value(subject, "subject"),
            text=text,
            html=html,
            cc=_mailboxes(request.cc, "cc"),
            bcc=_mailboxes(request.bcc, "bcc"),
            reply_to=_mailboxes(request.reply_to, "reply_to"),
            message_id=new_message_id(job_id, self.sender),
        )


def _refuse_email_fields(request: SendRequest) -> None:
    for field in EMAIL_ONLY:
        if getattr(request, field):
            raise InvalidRequest(f"{field}: email only, not for channel {request.channel!r}")


def _sms(job_id: str, request: SendRequest, rendered: Rendered) -> Message:
    _refuse_email_fields(request)
    text = request.text if request.text is not None else rendered.text
    if not text:
        raise InvalidRequest("text: required for sms (give it, or a template that does)")
    numbers = _unique([check_phone(v, "to") for v in request.to])
    extra = {"segments": count_segments(text).count}
    return Message(id=job_id, channel="sms", to=numbers, text=text, extra=extra)


def _other(job_id: str, request: SendRequest, rendered: Rendered) -> Message:
    """A third-party channel gets what was given; it validates what it needs itself."""
    return Message(
        id=job_id,
        channel=request.channel,
        to=_unique([check_header_value(v, "to") for v in request.to]),
        subject=request.subject if request.subject is not None else rendered.subject,
        text=request.text if request.text is not None else rendered.text,
        html=request.html if request.html is not None else rendered.html,
        cc=tuple(request.cc),
        bcc=tuple(request.bcc),
        reply_to=tuple(request.reply_to),
        extra={"data": request.data} if request.data else {},
    )
