"""SMS through HTTP gateways (httpx); the outbox stands in while no provider is configured."""

from __future__ import annotations

from notifier.channels.base import Channel
from notifier.channels.outbox import OutboxChannel
from notifier.settings import Settings


def create_channel(settings: Settings) -> Channel:
    if settings.sms_provider is None:
        return OutboxChannel(settings.outbox_dir, kind="sms")
    raise NotImplementedError("SMS providers arrive with the SMS channel")
