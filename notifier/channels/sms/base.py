"""What every SMS provider shares: the provider interface, HTTP failure rules, fan-out, failover.

A provider turns one (message, number) into one HTTP request and reads the answer; the
``SMSChannel`` sends to each number of a job once, through its provider's ``httpx.AsyncClient``
(keep-alive, ``NOTIFIER_SMS_TIMEOUT``), and folds the per-number results into a ``Receipt``
or one ``DeliveryError`` whose ``delivered`` names the numbers that did get the message. Each
provider has one client (``new_http_client``) on aiohttp's transport (``transport``).

Several providers (``NOTIFIER_SMS_PROVIDER=ihuyi,twilio``) are tried in order, each behind
its own circuit breaker (``notifier.channels.circuit``): a transient failure or a
``ProviderRejected`` moves the same number on to the next provider at once; a refusal of
the message or number, or ``RecipientThrottled``, stops there. When no provider could take
the number, the error is transient, so the job comes back after the backoff.

HTTP rules common to all providers (``http_error``): 408 and 5xx are transient, with
``Retry-After`` (seconds or an HTTP date) as ``retry_after``; 429 is ``RecipientThrottled``;
401 and 403 are ``ProviderRejected``; other 4xx are permanent. Timeouts and connection errors
are transient (``post``). Error messages never carry the request: ihuyi puts its API key in
the form body, and httpx messages do not echo bodies.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, TypeVar

import httpx
from pydantic import SecretStr

from notifier.channels.base import Channel
from notifier.channels.circuit import CircuitBreaker
from notifier.channels.sms.transport import GatewayClient, GatewayTransport
from notifier.errors import (
    DeliveryConnectionError,
    DeliveryError,
    DeliveryTimeout,
    InvalidMessage,
    InvalidRequest,
    PermanentDeliveryError,
    ProviderRejected,
    RecipientRejected,
    RecipientThrottled,
    TransientDeliveryError,
)
from notifier.http import retry_after
from notifier.models import Message, Receipt
from notifier.settings import Settings, SettingsError

T = TypeVar("T")

#: The settings every provider has, as in NOTIFIER_SMS_<NAME>_<SETTING>.
Setting = Literal["url", "account", "api_key", "from"]


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One provider's NOTIFIER_SMS_* settings, resolved as PROTOCOL.md says: a provider other
    than the first reads NOTIFIER_SMS_<NAME>_*; the first reads those, else NOTIFIER_SMS_*."""

    name: str
    first: bool
    url: str | None
    account: str | None
    api_key: SecretStr | None
    sender: str | None

    @classmethod
    def of(cls, settings: Settings, name: str) -> Self:
        first = settings.sms_provider[:1] == (name,)

        def pick(field: Setting) -> Any:
            own = getattr(settings, f"sms_{name}_{field}")
            return own if own is not None or not first else getattr(settings, f"sms_{field}")

        return cls(name, first, pick("url"), pick("account"), pick("api_key"), pick("from"))

    def required(self, value: T | None, field: Setting) -> T:
        """A setting the provider cannot work without; its absence stops the service."""
        if value is not None:
            return value
        own = f"NOTIFIER_SMS_{self.name.upper()}_{field.upper()}"
        variable = f"NOTIFIER_SMS_{field.upper()}" if self.first else own
        also = f" (or {own})" if self.first else ""
        raise SettingsError(f"{variable}: required for the {self.name} SMS provider{also}")


class SMSProvider(ABC):
    """One gateway's request format and answer codes."""

    name: ClassVar[str]

    #: The longest text (in characters) the gateway takes; None: no documented limit.
    max_text_length: ClassVar[int | None] = None

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings, config: ProviderConfig) -> Self:
        """Build from its settings; a missing one is a ``SettingsError``."""

    def refuses(self, number: str) -> str | None:
        """Why this gateway cannot send to ``number`` at all (another one may), or None."""
        return None

    @abstractmethod
    async def send_one(
        self, client: httpx.AsyncClient, text: str, number: str, job_id: str
    ) -> str | None:
        """Send ``text`` to ``number``; return the provider's message id, or raise
        ``DeliveryError``."""


def http_error(
    provider: str, response: httpx.Response, number: str, detail: str = ""
) -> DeliveryError:
    """The error for a non-2xx answer: 408 and 5xx transient, 429 the number throttled,
    401 and 403 our account refused, other 4xx permanent."""
    status = response.status_code
    text = f"{provider}: HTTP {status} {response.reason_phrase}" + (f": {detail}" if detail else "")
    if status == 429:
        return RecipientThrottled(text, recipient=number, retry_after=retry_after(response))
    if status == 408 or status >= 500:
        return TransientDeliveryError(text, retry_after=retry_after(response))
    if status in (401, 403):
        return ProviderRejected(text)
    return PermanentDeliveryError(text)


async def post(
    client: httpx.AsyncClient, provider: str, url: httpx.URL | str, **request: Any
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


def _host(url: httpx.URL | str) -> str:
    return httpx.URL(url).host or str(url)


def new_http_client(settings: Settings) -> httpx.AsyncClient:
    """One provider's client: up to ``NOTIFIER_SMS_CONCURRENCY`` keep-alive connections on
    aiohttp's connector (``transport``), timeouts, no redirects, no cookies."""
    size = settings.sms_concurrency
    return GatewayClient(
        transport=GatewayTransport(
            httpx.Limits(max_connections=size, max_keepalive_connections=size)
        ),
        timeout=httpx.Timeout(settings.sms_timeout),
        headers={"User-Agent": "notifier"},
        follow_redirects=False,
    )


@dataclass(frozen=True, slots=True)
class Route:
    """A provider, the circuit that says whether to try it now, and its HTTP client."""

    provider: SMSProvider
    circuit: CircuitBreaker
    client: httpx.AsyncClient


#: What one number came to: (provider name, provider id), or the error.
Sent = tuple[str, str | None]


class SMSChannel(Channel):
    def __init__(
        self,
        providers: Sequence[SMSProvider],
        clients: Sequence[httpx.AsyncClient],
        *,
        circuits: Sequence[CircuitBreaker] | None = None,
    ) -> None:
        """``clients``: one per provider, in the same order."""
        if not providers:
            raise ValueError("an SMS channel needs at least one provider")
        circuits = circuits or [CircuitBreaker(p.name) for p in providers]
        self.provider = ",".join(p.name for p in providers)
        self._routes = [
            Route(p, c, h) for p, c, h in zip(providers, circuits, clients, strict=True)
        ]
        limits = [p.max_text_length for p in providers if p.max_text_length is not None]
        #: The longest text every provider takes (failover must not meet a refusal).
        self.max_text_length: int | None = min(limits, default=None)

    @property
    def circuits(self) -> list[CircuitBreaker]:
        return [route.circuit for route in self._routes]

    def check(self, message: Message) -> None:
        """Refuse at intake what no provider would take (``InvalidRequest`` naming the field)."""
        length = len(message.text or "")
        if self.max_text_length is not None and length > self.max_text_length:
            raise InvalidRequest(
                f"text: {length} characters, more than the {self.max_text_length} "
                f"the SMS provider ({self.provider}) accepts"
            )

    async def send(self, message: Message) -> Receipt:
        """Each number once; some failing raise with ``delivered`` set for the others."""
        if not message.text:
            raise InvalidMessage(f"{self.provider}: the message has no text")
        numbers = message.pending_to
        if len(numbers) == 1:  # the common case, without a task per number
            result = await self._one(message, numbers[0])
            if isinstance(result, DeliveryError):
                raise result
            name, provider_id = result
            return Receipt(provider_ids={numbers[0]: provider_id}, providers={numbers[0]: name})
        results = await asyncio.gather(*(self._one(message, number) for number in numbers))
        sent = {n: r for n, r in zip(numbers, results, strict=True) if isinstance(r, tuple)}
        failed = {n: r for n, r in zip(numbers, results, strict=True) if not isinstance(r, tuple)}
        delivered = {number: provider_id for number, (_, provider_id) in sent.items()}
        providers = {number: name for number, (name, _) in sent.items()}
        if not failed:
            return Receipt(provider_ids=delivered, providers=providers)
        raise _combined(failed, delivered, providers, total=len(numbers))

    async def aclose(self) -> None:
        for route in self._routes:
            await route.client.aclose()

    async def _one(self, message: Message, number: str) -> Sent | DeliveryError:
        """The number through the first provider that takes it (see the module docstring)."""
        errors: list[DeliveryError] = []
        routes = [r for r in self._routes if r.provider.refuses(number) is None]
        if not routes:
            reasons = (r.provider.refuses(number) for r in self._routes)
            return RecipientRejected("; ".join(r for r in reasons if r))
        for route in routes:
            if not route.circuit.allow():
                continue
            try:
                provider_id = await route.provider.send_one(
                    route.client, message.text or "", number, message.id
                )
            except ProviderRejected as exc:
                route.circuit.trip(exc.message)
                errors.append(exc)
            except (PermanentDeliveryError, RecipientThrottled) as exc:
                route.circuit.succeeded()  # it answered: it is up, the message is the problem
                return exc
            except TransientDeliveryError as exc:
                route.circuit.failed(exc.message)
                errors.append(exc)
            else:
                route.circuit.succeeded()
                return route.provider.name, provider_id
        return _unavailable(errors, routes)


def _unavailable(errors: list[DeliveryError], routes: list[Route]) -> DeliveryError:
    """No provider took the number: try again later, whichever way each one failed."""
    if len(errors) == 1 and errors[0].transient:
        return errors[0]
    if not errors:
        names = ", ".join(route.provider.name for route in routes)
        wait = min(route.circuit.reopens_in() for route in routes)
        return TransientDeliveryError(
            f"every SMS provider's circuit is open ({names})", retry_after=wait or None
        )
    waits = [e.retry_after for e in errors if e.retry_after is not None]
    error = TransientDeliveryError(
        "no SMS provider took it: " + "; ".join(e.message for e in errors),
        retry_after=max(waits, default=None),
    )
    error.__cause__ = errors[-1]
    return error


def _combined(
    failed: dict[str, DeliveryError],
    delivered: dict[str, str | None],
    providers: dict[str, str],
    *,
    total: int,
) -> DeliveryError:
    """One error for several failed numbers: transient if any is, the longest wait."""
    transient = [error for error in failed.values() if error.transient]
    text = f"{len(failed)} of {total} numbers failed: " + "; ".join(
        f"{number}: {error.message}" for number, error in failed.items()
    )
    waits = [e.retry_after for e in transient if e.retry_after is not None]
    cls = TransientDeliveryError if transient else PermanentDeliveryError
    error = cls(
        text,
        retry_after=max(waits, default=None),
        delivered=delivered,
        providers=providers,
        failed=failed,
    )
    error.__cause__ = next(iter(failed.values()))
    return error
