"""Delivery channels: one interface, a registry, and the built-in email, SMS and outbox."""

from notifier.channels.base import Channel
from notifier.channels.registry import ENTRY_POINT_GROUP, load_channels

__all__ = ["ENTRY_POINT_GROUP", "Channel", "load_channels"]
