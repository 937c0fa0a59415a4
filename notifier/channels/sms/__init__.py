"""SMS through HTTP gateways (httpx); the outbox stands in while no provider is configured.

``NOTIFIER_SMS_PROVIDER`` picks one of ``PROVIDERS``; each lives in its own module and
reads the NOTIFIER_SMS_* settings as docs/protocol.md's table says. ``base`` holds what they
share: the provider interface, the HTTP failure rules and the per-number fan-out.
"""

from __future__ import annotations

from notifier.channels.base import Channel
from notifier.channels.outbox import OutboxChannel
from notifier.channels.sms.base import SMSChannel, SMSProvider, new_http_clients
from notifier.channels.sms.ihuyi import IhuyiProvider
from notifier.channels.sms.twilio import TwilioProvider
from notifier.channels.sms.webhook import WebhookProvider
from notifier.settings import Settings

PROVIDERS: dict[str, type[SMSProvider]] = {
    provider.name: provider for provider in (IhuyiProvider, TwilioProvider, WebhookProvider)
}

__all__ = ["PROVIDERS", "SMSChannel", "SMSProvider", "create_channel"]


def create_channel(settings: Settings) -> Channel:
    if settings.sms_provider is None:
        return OutboxChannel(settings.outbox_dir, kind="sms")
    provider = PROVIDERS[settings.sms_provider].from_settings(settings)
    return SMSChannel(provider, new_http_clients(settings))
