"""SMS through HTTP gateways (httpx); the outbox stands in while no provider is configured.

``NOTIFIER_SMS_PROVIDER`` picks one of ``PROVIDERS``; each lives in its own module and
reads the NOTIFIER_SMS_* settings as docs/protocol.md's table says. ``base`` holds what they
share: the provider interface, the HTTP failure rules and the per-number fan-out.

Several providers (``ihuyi,twilio``) are tried in that order, each behind its own circuit
breaker; each reads its own NOTIFIER_SMS_<NAME>_* settings, the first also the unprefixed
ones (``ProviderConfig``). ``segments`` counts what a text costs.
"""

from __future__ import annotations

from notifier.channels.base import Channel
from notifier.channels.circuit import CircuitBreaker
from notifier.channels.outbox import OutboxChannel
from notifier.channels.sms.base import ProviderConfig, SMSChannel, SMSProvider, new_http_client
from notifier.channels.sms.ihuyi import IhuyiProvider
from notifier.channels.sms.twilio import TwilioProvider
from notifier.channels.sms.webhook import WebhookProvider
from notifier.settings import Settings

PROVIDERS: dict[str, type[SMSProvider]] = {
    provider.name: provider for provider in (IhuyiProvider, TwilioProvider, WebhookProvider)
}

__all__ = ["PROVIDERS", "ProviderConfig", "SMSChannel", "SMSProvider", "create_channel"]


def create_channel(settings: Settings) -> Channel:
    if not settings.sms_provider:
        return OutboxChannel(settings.outbox_dir, kind="sms")
    providers = [
        PROVIDERS[name].from_settings(settings, ProviderConfig.of(settings, name))
        for name in settings.sms_provider
    ]
    circuits = [
        CircuitBreaker(
            provider.name,
            failures=settings.circuit_failures,
            open_seconds=settings.circuit_open_seconds,
        )
        for provider in providers
    ]
    clients = [new_http_client(settings) for _ in providers]
    return SMSChannel(providers, clients, circuits=circuits)
