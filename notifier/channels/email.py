"""Email over SMTP (aiosmtplib); the outbox stands in while no SMTP host is configured."""

from __future__ import annotations

from notifier.channels.base import Channel
from notifier.channels.outbox import OutboxChannel
from notifier.settings import Settings


def create_channel(settings: Settings) -> Channel:
    if settings.smtp_host is None:
        return OutboxChannel(settings.outbox_dir, kind="email", sender=settings.smtp_from)
    raise NotImplementedError("SMTP delivery arrives with the email channel")
