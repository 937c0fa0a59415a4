"""Job events POSTed to the app (docs/protocol.md, Callbacks): an outbox with its own lane.

The store writes each event in the same transaction as the outcome that causes it (a job
reaching a final status, a receipt changing a recipient's state), so no final status exists
without its pending event and a kill -9 in between loses nothing. This lane claims due events
under a lease (on PostgreSQL one instance posts each, as with jobs), POSTs them through httpx
with its own concurrency and timeout, and records sent, retry later (tenacity backoff, as for
deliveries) or given up. A slow or dead receiver slows only this lane, never a delivery.

Classification, done only by ``classify``: a 2xx is sent; connection errors, timeouts, 408,
429 (with ``Retry-After``) and 5xx are retried; any other answer gives the event up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta

import httpx
import pydantic_core

from notifier.backoff import Backoff
from notifier.batching import Batcher
from notifier.http import SIGNATURE_HEADER, retry_after, sign
from notifier.metrics import Metrics
from notifier.models import CallbackState, Event, EventOutcome, isoformat, utcnow
from notifier.settings import Settings
from notifier.store import Store, StoreUnavailable

log = logging.getLogger("notifier.callbacks")


def event_body(event: Event) -> bytes:
    """The raw body: what the receiver verifies the signature over."""
    return pydantic_core.to_json(
        {
            "event_id": event.id,
            "type": event.type,
            "created_at": isoformat(event.created_at),
            "job": event.job.to_status(),
        }
    )


class CallbackFailed(Exception):
    """One POST did not succeed; ``retryable`` says whether to try again later."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


def classify(response: httpx.Response) -> None:
    """Return for a 2xx; raise CallbackFailed saying whether the answer is worth a retry."""
    if response.is_success:
        return
    status = response.status_code
    message = f"HTTP {status} {response.reason_phrase}"
    if status in (408, 429) or status >= 500:
        raise CallbackFailed(message, retryable=True, retry_after=retry_after(response))
    raise CallbackFailed(message, retryable=False)


class Callbacks:
    """The callback lane: claim, post, record, until stopped."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        metrics: Metrics,
        client: httpx.AsyncClient | None = None,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.owner = owner or f"callbacks-{uuid.uuid4().hex[:12]}"
        self._secret = (
            settings.callback_secret.get_secret_value().encode()
            if settings.callback_secret is not None
            else None
        )
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(settings.callback_timeout),
            limits=httpx.Limits(max_connections=settings.callback_concurrency),
            headers={"User-Agent": "notifier"},
            follow_redirects=False,
        )
        self._backoff = Backoff(settings.retry_base_delay, settings.retry_max_delay)
        self._recorder: Batcher[EventOutcome, None] = Batcher(self._record)
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopped.set()
        store.on_work(self._wake.set)

    async def run(self) -> None:
        """Post events until ``stop``."""
        concurrency = self.settings.callback_concurrency
        self._stopped.clear()
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                free = concurrency - len(self._in_flight)
                claimed = await self._claim(free) if free else 0
                if claimed and claimed == free:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval)
        finally:
            self._stopped.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming; let posts finish within ``grace``; the rest are posted again later
        (their leases end, or the next start takes them back)."""
        self._stopping.set()
        self._wake.set()
        await self._stopped.wait()
        tasks = list(self._in_flight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.wait(tasks)
        await self._recorder.drain()
        await self._client.aclose()

    async def _claim(self, limit: int) -> int:
        try:
            events = await self.store.claim_events(
                owner=self.owner, limit=limit, lease_seconds=self.settings.lease_seconds
            )
        except StoreUnavailable as exc:
            log.warning("callbacks: store unavailable: %s", exc)
            return 0
        for event in events:  # a stop that came meanwhile waits for these too
            self._in_flight[event.id] = asyncio.create_task(
                self._post(event), name=f"callback-{event.id}"
            )
        return len(events)

    async def _post(self, event: Event) -> None:
        try:
            try:
                outcome = await self._attempt(event)
            except Exception as exc:  # a bug here must not leave the event leased for ever
                log.exception("callback %s: posting failed unexpectedly", event.id)
                outcome = self._failed(
                    event, CallbackFailed(f"internal error: {exc!r}", retryable=True)
                )
            await asyncio.shield(self._recorder.put(outcome))
        except StoreUnavailable as exc:
            log.warning("callback %s: outcome not recorded (%s); posted again later", event.id, exc)
        finally:
            self._in_flight.pop(event.id, None)
            self._wake.set()

    async def _attempt(self, event: Event) -> EventOutcome:
        body = event_body(event)
        headers = {"Content-Type": "application/json"}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        try:
            try:
                response = await self._client.post(event.url, content=body, headers=headers)
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise CallbackFailed(f"bad callback_url: {exc}", retryable=False) from exc
            except httpx.TransportError as exc:
                raise CallbackFailed(f"{type(exc).__name__}: {exc}", retryable=True) from exc
            classify(response)
        except CallbackFailed as failure:
            return self._failed(event, failure)
        self.metrics.callbacks.labels(CallbackState.SENT.value).inc()
        return EventOutcome(event.id, CallbackState.SENT)

    def _failed(self, event: Event, failure: CallbackFailed) -> EventOutcome:
        reason = f"{_host(event.url)}: {failure}"
        if failure.retryable and event.attempts < self.settings.callback_max_attempts:
            wait = self._backoff.delay(event.attempts, failure.retry_after)
            self.metrics.callbacks.labels("retried").inc()
            return EventOutcome(
                event.id,
                CallbackState.PENDING,
                last_error=reason,
                run_at=utcnow() + timedelta(seconds=wait),
            )
        if failure.retryable:
            reason = f"gave up after {event.attempts} attempts: {reason}"
        log.warning("callback %s for job %s given up: %s", event.id, event.job.id, reason)
        self.metrics.callbacks.labels(CallbackState.FAILED.value).inc()
        return EventOutcome(event.id, CallbackState.FAILED, last_error=reason)

    async def _record(self, outcomes: Sequence[EventOutcome]) -> list[None]:
        await self.store.record_events(self.owner, outcomes)
        return [None] * len(outcomes)


def _host(url: str) -> str:
    """Where a callback goes, for errors and logs (a URL may carry a token: not all of it)."""
    try:
        return httpx.URL(url).host or "?"
    except httpx.InvalidURL:
        return "?"
