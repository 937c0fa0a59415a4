"""What every SMS provider shares: the provider interface, HTTP failure rules, fan-out.

A provider turns one (message, number) into one HTTP request and reads the answer; the
``SMSChannel`` sends to each number of a job once, through one shared ``httpx.AsyncClient``
(keep-alive, ``NOTIFIER_SMS_TIMEOUT``), and folds the per-number results into a ``Receipt``
or one ``DeliveryError`` whose ``delivered`` names the numbers that did get the message.

HTTP rules common to all providers (``http_error``): 408, 429 and 5xx are transient, with
``Retry-After`` (seconds or an HTTP date) as ``retry_after``; other 4xx are permanent.
Timeouts and connection errors are transient (``post``). Error messages never carry the
request: ihuyi puts its API key in the form body, and httpx messages do not echo bodies.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Self, TypeVar

import httpx

from notifier.channels.base import Channel
from notifier.errors import (
    DeliveryConnectionError,
    DeliveryError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from notifier.models import Message, Receipt, utcnow
from notifier.settings import Settings, SettingsError

T = TypeVar("T")


class SMSProvider(ABC):
    """One gateway's request format and answer codes."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> Self:
        """Build from the NOTIFIER_SMS_* settings; a missing one is a ``SettingsError``."""

    @abstractmethod
    async def send_one(
        self, client: httpx.AsyncClient, text: str, number: str, job_id: str
    ) -> str | None:
        """Send ``text`` to ``number``; return the provider's message id, or raise
        ``DeliveryError``."""


def required(value: T | None, variable: str, provider: str) -> T:
    """A setting the provider cannot work without; its absence stops the service at start."""
    if value is None:
        raise SettingsError(f"NOTIFIER_{variable}: required for the {provider} SMS provider")
    return value


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds from now, given as seconds or as an HTTP date."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - utcnow()).total_seconds())


def http_error(provider: str, response: httpx.Response, detail: str = "") -> DeliveryError:
    """The error for a non-2xx answer: 408, 429 and 5xx transient, other 4xx permanent."""
    status = response.status_code
    text = f"{provider}: HTTP {status} {response.reason_phrase}" + (f": {detail}" if detail else "")
    if status in (408, 429) or status >= 500:
        return TransientDeliveryError(text, retry_after=retry_after(response))
    return PermanentDeliveryError(text)


async def post(
    client: httpx.AsyncClient, provider: str, url: str, **request: Any
) -> httpx.Response:
    """POST, with transport failures translated; the messages name the host, not the request."""
    try:
        return await client.post(url, **request)
    except httpx.TimeoutException as exc:
        raise DeliveryTimeout(
            f"{provider}: timed out talking to {_host(url)} ({type(exc).__name__})"
        ) from exc
    except httpx.TransportError as exc:
        raise DeliveryConnectionError(
            f"{provider}: cannot reach {_host(url)}: {type(exc).__name__}: {exc}"
        ) from exc


def _host(url: str) -> str:
    return httpx.URL(url).host or url


#: Connections per httpx client. httpcore scans its whole pool on every request, so one
#: large pool gets slower as concurrency grows (bench/README.md); several small ones don't.
CONNECTIONS_PER_CLIENT = 8


def new_http_clients(settings: Settings) -> list[httpx.AsyncClient]:
    """The clients SMS requests share in turn: keep-alive pools, timeouts, no redirects."""
    count = -(-settings.sms_concurrency // CONNECTIONS_PER_CLIENT)
    size = -(-settings.sms_concurrency // count)
    return [
        httpx.AsyncClient(
            timeout=httpx.Timeout(settings.sms_timeout),
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            headers={"User-Agent": "notifier"},
            follow_redirects=False,
        )
        for _ in range(count)
    ]


class SMSChannel(Channel):
    def __init__(self, provider: SMSProvider, clients: Sequence[httpx.AsyncClient]) -> None:
        self.provider = provider.name
        self._provider = provider
        self._clients = list(clients)
        self._busy = [0] * len(self._clients)

    async def send(self, message: Message) -> Receipt:
        """Each number once; some failing raise with ``delivered`` set for the others."""
        if not message.text:
            raise PermanentDeliveryError(f"{self.provider}: the message has no text")
        numbers = message.pending_to
        results = await asyncio.gather(*(self._one(message, number) for number in numbers))
        delivered = {
            n: r for n, r in zip(numbers, results, strict=True) if not isinstance(r, DeliveryError)
        }
        failed = {
            n: r for n, r in zip(numbers, results, strict=True) if isinstance(r, DeliveryError)
        }
        if not failed:
            return Receipt(provider_ids=delivered)
        if len(numbers) == 1:
            raise next(iter(failed.values()))
        raise _combined(failed, delivered, total=len(numbers))

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def _one(self, message: Message, number: str) -> str | DeliveryError | None:
        turn = self._busy.index(min(self._busy))  # the least busy pool: none waits needlessly
        self._busy[turn] += 1
        try:
            return await self._provider.send_one(
                self._clients[turn], message.text or "", number, message.id
            )
        except DeliveryError as exc:
            return exc
        finally:
            self._busy[turn] -= 1


def _combined(
    failed: dict[str, DeliveryError], delivered: dict[str, str | None], *, total: int
) -> DeliveryError:
    """One error for several failed numbers: transient if any is, the longest wait."""
    transient = [error for error in failed.values() if error.transient]
    text = f"{len(failed)} of {total} numbers failed: " + "; ".join(
        f"{number}: {error.message}" for number, error in failed.items()
    )
    if not transient:
        error: DeliveryError = PermanentDeliveryError(text, delivered=delivered)
    else:
        waits = [e.retry_after for e in transient if e.retry_after is not None]
        error = TransientDeliveryError(
            text, retry_after=max(waits, default=None), delivered=delivered
        )
    error.__cause__ = next(iter(failed.values()))
    return error
