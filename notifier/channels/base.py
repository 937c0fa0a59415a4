"""The channel interface: one method to deliver, one to let go of connections.

Like httpx's transports, a channel knows nothing of jobs, stores or retries. It delivers one
message and either returns a ``Receipt`` or raises a ``DeliveryError`` whose class says
whether trying again can help; the dispatcher does the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from notifier.models import Message, Receipt


class Channel(ABC):
    #: The provider behind the channel, for logs and metrics ("smtp", "ihuyi", "outbox", ...).
    provider: str = "unknown"

    #: True when the channel does not really deliver (the outbox); the service warns at start.
    simulated: bool = False

    @abstractmethod
    async def send(self, message: Message) -> Receipt:
        """Deliver ``message`` or raise ``notifier.errors.DeliveryError``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most channels hold nothing
        """Close pooled connections; called once at shutdown."""
