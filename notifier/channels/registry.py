"""Which channel serves which name, resolved once at start-up.

Built-in channels are an explicit name -> factory map (as uvicorn's config maps names to
import strings); third-party packages add theirs through the ``notifier.channels``
entry-point group. A factory takes the ``Settings`` and returns a ``Channel``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

from notifier.channels.base import Channel
from notifier.settings import Settings

ENTRY_POINT_GROUP = "notifier.channels"

BUILTIN_CHANNELS: dict[str, str] = {
    "email": "notifier.channels.email:create_channel",
    "sms": "notifier.channels.sms:create_channel",
}

ChannelFactory = Callable[[Settings], Channel]


def _import(target: str) -> ChannelFactory:
    module_name, _, attribute = target.partition(":")
    factory: ChannelFactory = getattr(importlib.import_module(module_name), attribute)
    return factory


def channel_factories() -> dict[str, ChannelFactory]:
    """Built-ins first; an entry point may add a name, or replace a built-in on purpose."""
    factories = {name: _import(target) for name, target in BUILTIN_CHANNELS.items()}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        factories[entry.name] = entry.load()
    return factories


def load_channels(settings: Settings) -> dict[str, Channel]:
    return {name: factory(settings) for name, factory in channel_factories().items()}
