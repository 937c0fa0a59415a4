"""``notifier`` exports exactly its public surface (httpx's test of the same name)."""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

import notifier
import notifier.errors
from notifier.errors import ERRORS_BY_CODE

PUBLIC = {
    "AsyncClient",
    "Channel",
    "Client",
    "DeliveryConnectionError",
    "DeliveryError",
    "DeliveryTimeout",
    "InternalError",
    "InvalidJSON",
    "InvalidMessage",
    "InvalidRequest",
    "JobInfo",
    "JobStatus",
    "LineTooLong",
    "Message",
    "NotFound",
    "NotifierConnectionError",
    "NotifierError",
    "PermanentDeliveryError",
    "ProviderRejected",
    "RateLimited",
    "Receipt",
    "RecipientRejected",
    "RecipientThrottled",
    "SendResult",
    "Suppression",
    "TemplateError",
    "TransientDeliveryError",
    "Unauthorized",
    "Unavailable",
    "UnknownChannel",
    "UnknownOp",
    "UnknownTemplate",
    "__version__",
}


def test_all_names_exactly_the_public_surface() -> None:
    assert sorted(notifier.__all__) == sorted(PUBLIC)
    assert len(notifier.__all__) == len(set(notifier.__all__))


def test_every_public_attribute_is_in_all() -> None:
    """Nothing leaks: the only other public attributes are the package's own modules."""
    public = {
        name
        for name in dir(notifier)
        if not name.startswith("_") and not isinstance(getattr(notifier, name), ModuleType)
    }
    assert public == PUBLIC - {"__version__"}


def test_every_error_class_is_exported() -> None:
    exported = {getattr(notifier, name) for name in notifier.__all__}
    assert set(ERRORS_BY_CODE.values()) <= exported


def test_every_delivery_error_is_exported() -> None:
    """A third-party channel raises these; it must not have to import private modules."""
    delivery_errors = {
        cls
        for _, cls in inspect.getmembers(notifier.errors, inspect.isclass)
        if issubclass(cls, notifier.errors.DeliveryError)
    }
    exported = {getattr(notifier, name) for name in notifier.__all__}
    assert delivery_errors <= exported
    assert len(delivery_errors) >= 5


def test_a_channel_can_be_written_from_the_public_surface() -> None:
    """What docs/channels.md shows a channel author, with nothing but ``notifier.*`` names."""

    class Pigeon(notifier.Channel):
        provider = "pigeon"

        async def send(self, message: notifier.Message) -> notifier.Receipt:
            if "lost@example.com" in message.to:
                raise notifier.TransientDeliveryError("pigeon: bird did not come back")
            return notifier.Receipt(provider_ids=dict.fromkeys(message.to))

    channel = Pigeon()
    message = notifier.Message(id="j1", channel="pigeon", to=("ada@example.com",))
    receipt = asyncio.run(channel.send(message))
    assert receipt.provider_ids == {"ada@example.com": None}
    lost = notifier.Message(id="j2", channel="pigeon", to=("lost@example.com",))
    try:
        asyncio.run(channel.send(lost))
    except notifier.DeliveryError as exc:
        assert exc.transient
    else:
        raise AssertionError("the channel did not raise")
    asyncio.run(channel.aclose())


def test_version() -> None:
    try:
        expected = version("notifier")
    except PackageNotFoundError:  # a source tree that was never installed
        expected = "0+unknown"
    assert notifier.__version__ == expected
