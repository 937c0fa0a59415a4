"""The channel interface: one method to deliver, one to let go of connections.

Like httpx's transports, a channel knows nothing of jobs, stores or retries. It delivers one
message and either returns a ``Receipt`` or raises a ``DeliveryError`` whose class says
whether trying again can help; the dispatcher does the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from notifier.channels.aimd import AIMDWindow
from notifier.channels.circuit import CircuitBreaker
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

    def check(self, message: Message) -> None:  # noqa: B027 - optional hook
        """Refuse at intake, raising ``InvalidRequest`` naming the field, what the provider
        would refuse later (an SMS longer than it takes): the sender hears it at once."""

    @property
    def circuits(self) -> Sequence[CircuitBreaker]:
        """The circuit breakers of the providers behind the channel, shown in metrics."""
        return ()

    @property
    def windows(self) -> Mapping[str, AIMDWindow]:
        """The adaptive concurrency window of each relay or provider, shown in metrics."""
        return {}
