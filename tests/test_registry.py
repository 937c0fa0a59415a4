"""Channels come from the built-in map plus the ``notifier.channels`` entry-point group.

The third-party channel here is installed for real: a module and a ``*.dist-info`` with an
``entry_points.txt`` on ``sys.path``, as ``pip install`` would leave them.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from notifier.channels import ENTRY_POINT_GROUP, Channel, load_channels
from notifier.channels.outbox import OutboxChannel
from notifier.models import Message
from notifier.settings import Settings

#: A complete third-party channel: a factory taking the settings, a Channel subclass.
EXAMPLE_CHANNEL = '''
from notifier.channels import Channel
from notifier.models import Receipt


class PigeonChannel(Channel):
    """Delivers by carrier pigeon: remembers each message and names the bird."""

    provider = "pigeon"

    def __init__(self, loft):
        self.loft = loft
        self.sent = []

    async def send(self, message):
        self.sent.append(message)
        return Receipt(provider_ids={to: f"{self.loft}-bird" for to in message.to})


def create_channel(settings):
    return PigeonChannel(loft=settings.host)
'''


def install(site: Path, entry_points: str) -> None:
    """Install the example package into ``site`` as a distribution with entry points."""
    (site / "notifier_pigeon.py").write_text(EXAMPLE_CHANNEL, encoding="utf-8")
    info = site / "notifier_pigeon-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: notifier-pigeon\nVersion: 1.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points), encoding="utf-8")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("notifier_pigeon", None)


def settings(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, host="loft7", outbox_dir=tmp_path / "outbox")  # type: ignore[call-arg]


async def test_an_entry_point_adds_a_channel(site: Path) -> None:
    install(site, f"[{ENTRY_POINT_GROUP}]\npigeon = notifier_pigeon:create_channel\n")

    channels = load_channels(settings(site))

    assert set(channels) == {"email", "sms", "pigeon"}
    pigeon = channels["pigeon"]
    assert isinstance(pigeon, Channel) and pigeon.provider == "pigeon"
    receipt = await pigeon.send(Message(id="j1", channel="pigeon", to=("roof",), text="coo"))
    assert receipt.provider_ids == {"roof": "loft7-bird"}


def test_an_entry_point_may_replace_a_built_in(site: Path) -> None:
    install(site, f"[{ENTRY_POINT_GROUP}]\nsms = notifier_pigeon:create_channel\n")

    channels = load_channels(settings(site))

    assert channels["sms"].provider == "pigeon"
    assert isinstance(channels["email"], OutboxChannel)


def test_without_entry_points_only_the_built_ins(tmp_path: Path) -> None:
    channels = load_channels(settings(tmp_path))

    assert set(channels) == {"email", "sms"}
    assert all(channel.simulated for channel in channels.values())
