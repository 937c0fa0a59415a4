"""Claim due jobs, hand them to their channel, record what happened.

Like arq's worker: one loop per channel claims as many jobs as it has free slots (its
concurrency), each delivery runs under a timeout, outcomes are recorded in batches under
``asyncio.shield`` so cancellation cannot lose them, and at shutdown the deliveries that do
not finish within the grace period are cancelled and released back to the queue.

The only question asked of a failure is ``DeliveryError.transient``; the channel decided it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import tenacity

from notifier.backoff import Backoff
from notifier.batching import Batcher
from notifier.channels.base import Channel
from notifier.channels.mime import envelope
from notifier.errors import DeliveryError, DeliveryTimeout, TransientDeliveryError, throttled
from notifier.metrics import Metrics
from notifier.models import Job, JobStatus, Message, Outcome, Receipt, utcnow
from notifier.settings import Settings
from notifier.store import Store, StoreUnavailable

log = logging.getLogger("notifier.dispatcher")

#: How long a number is held when its provider says "too often" without saying how long.
THROTTLE_HOLD = 60.0


class _LaneMetrics:
    """The lane's metric children, looked up once rather than per delivery."""

    def __init__(self, metrics: Metrics, channel: str, provider: str) -> None:
        self.attempt_seconds = metrics.attempt_seconds.labels(channel, provider)
        self.age_seconds = metrics.accept_to_delivered_seconds.labels(channel)
        self.counters = {
            JobStatus.DELIVERED: metrics.delivered.labels(channel, provider),
            JobStatus.RETRYING: metrics.retried.labels(channel, provider),
            JobStatus.FAILED: metrics.failed.labels(channel, provider),
        }


@dataclass
class _Lane:
    """One channel's loop state: its concurrency and the deliveries in flight."""

    name: str
    channel: Channel
    concurrency: int
    metrics: _LaneMetrics
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    #: Every job this lane claimed and has not yet recorded or given back.
    held: set[str] = field(default_factory=set)
    #: A claim failed: it may have committed without its answer reaching us.
    claim_lost: bool = False
    aging_share: float = 0.0
    aging_credit: float = 0.0

    def oldest_slots(self, limit: int) -> int:
        """How many of ``limit`` slots go to the longest-waiting jobs whatever their priority:
        ``aging_share`` of all claimed slots over time, so small claims get their turn too."""
        self.aging_credit += limit * self.aging_share
        slots = min(limit, int(self.aging_credit))
        self.aging_credit -= slots
        return slots


class Dispatcher:
    def __init__(
        self,
        store: Store,
        channels: Mapping[str, Channel],
        settings: Settings,
        *,
        metrics: Metrics,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.owner = owner or f"notifier-{uuid.uuid4().hex[:12]}"
        self.backoff = Backoff(settings.retry_base_delay, settings.retry_max_delay)
        self._lanes = [
            _Lane(
                name,
                channel,
                settings.concurrency_for(name),
                _LaneMetrics(metrics, name, channel.provider),
                aging_share=settings.priority_aging_share,
            )
            for name, channel in channels.items()
        ]
        self._recorder: Batcher[Outcome, bool] = Batcher(self._record)
        #: While numbers this instance saw throttled are held, SMS claims are paced even
        #: without NOTIFIER_SMS_RECIPIENT_LIMITS.
        self._holding_until = datetime.min.replace(tzinfo=UTC)
        self._stopping = asyncio.Event()
        #: Set when shutdown's grace has run out: outcome records stop riding out an outage.
        self._abandoning = asyncio.Event()
        self._lanes_stopped = asyncio.Event()
        self._lanes_stopped.set()
        store.on_work(self.wake)

    def wake(self) -> None:
        for lane in self._lanes:
            lane.wake.set()

    async def run(self) -> None:
        """Deliver until ``stop`` is called."""
        if await self._recover():
            await self._run_lanes(burst=False, keep_leases=True)

    async def _recover(self) -> bool:
        """Take back what dead instances left, before claiming anything; while the store
        fails (it just opened, but may fail again at once) try again, or the dispatcher would
        die and the service run on without delivering. False if stopped meanwhile."""
        while not self._stopping.is_set():
            try:
                await self.store.recover(owner=self.owner)
            except StoreUnavailable as exc:
                log.warning("recovering work left in flight: store unavailable: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.settings.poll_interval)
            else:
                return True
        return False

    async def run_burst(self) -> None:
        """Deliver everything due now (and retries that fall due meanwhile), then return."""
        await self._run_lanes(burst=True, keep_leases=False)

    async def _run_lanes(self, *, burst: bool, keep_leases: bool) -> None:
        self._lanes_stopped.clear()
        async with asyncio.TaskGroup() as group:
            if keep_leases:
                group.create_task(self._keep_leases(), name="dispatcher-leases")
            for lane in self._lanes:
                group.create_task(self._run_lane(lane, burst=burst), name=f"lane-{lane.name}")
        self._lanes_stopped.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming; let deliveries finish and their outcomes be recorded within
        ``grace`` seconds, release the rest.

        An outcome the store cannot take by then (disk full, database down) is given up:
        its job stays leased to this instance and is claimed again after the next start, or
        by another instance once this one's heartbeat stops. So a delivery made is never
        marked undone, at worst made again (at least once), and shutdown never outlasts
        the grace because the store is down.
        """
        deadline = asyncio.get_running_loop().time() + grace
        self._stopping.set()
        self.wake()
        await self._lanes_stopped.wait()
        tasks = [task for lane in self._lanes for task in lane.in_flight.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                log.warning("shutdown: releasing %d deliveries still in flight", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._recorder.drain(), remaining)
        self._abandoning.set()
        await self._recorder.drain()

    async def _run_lane(self, lane: _Lane, *, burst: bool) -> None:
        while not self._stopping.is_set():
            lane.wake.clear()
            free = lane.concurrency - len(lane.in_flight)
            if free < self._claim_at_least(lane):
                await lane.wake.wait()
                continue
            claimed = await self._claim(lane, free)
            if claimed == free:
                continue
            if burst and not lane.in_flight and not claimed:
                due = await self._next_due(lane)
                if due is None or (due - utcnow()).total_seconds() > self.settings.poll_interval:
                    return
            await self._sleep_until_due(lane)

    @staticmethod
    def _claim_at_least(lane: _Lane) -> int:
        """Busy lanes claim once a quarter of their slots is free, not one job per delivery."""
        return 1 if not lane.in_flight else max(1, lane.concurrency // 4)

    async def _sleep_until_due(self, lane: _Lane) -> None:
        """Until woken (new work, free slots, stop), the next job falls due, or a poll."""
        timeout = self.settings.poll_interval
        due = await self._next_due(lane)
        if due is not None:
            timeout = min(timeout, max(0.0, (due - utcnow()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lane.wake.wait(), timeout)

    async def _next_due(self, lane: _Lane) -> datetime | None:
        try:
            return await self.store.next_due(lane.name)
        except StoreUnavailable:
            return None  # the claim that follows says so in the log

    async def _claim(self, lane: _Lane, limit: int) -> int:
        if lane.claim_lost and not await self._release_unheld(lane):
            return 0
        try:
            jobs = await self.store.claim(
                lane.name,
                owner=self.owner,
                limit=limit,
                lease_seconds=self.settings.lease_seconds,
                oldest=lane.oldest_slots(limit),
            )
        except StoreUnavailable as exc:
            log.warning("claim %s: store unavailable: %s", lane.name, exc)
            lane.claim_lost = True
            return 0
        lane.held.update(job.id for job in jobs)
        try:
            admitted = await self._paced(lane, jobs)
            suppressed = await self._suppressed(lane, admitted)
        except StoreUnavailable as exc:
            log.warning("claim %s: store unavailable: %s", lane.name, exc)
            await asyncio.shield(self._release(*jobs))
            lane.held.difference_update(job.id for job in jobs)
            return 0
        lane.held.difference_update({job.id for job in jobs} - {job.id for job in admitted})
        for job in admitted:
            task = asyncio.create_task(
                self._deliver(lane, job, suppressed), name=f"deliver-{job.id}"
            )
            lane.in_flight[job.id] = task
        return len(jobs)

    async def _release_unheld(self, lane: _Lane) -> bool:
        """After a failed claim, give back what it may have claimed unbeknown to us, rather
        than leave it leased to this live instance until the lease runs out. This lane is
        the only claimer of its channel for this owner, and holds every job it knows of."""
        try:
            count = await self.store.release_unheld(self.owner, lane.name, set(lane.held))
        except StoreUnavailable as exc:
            log.warning("claim %s: store unavailable: %s", lane.name, exc)
            return False
        lane.claim_lost = False
        if count:
            log.warning("claim %s: %d jobs claimed without an answer given back", lane.name, count)
        return True

    async def _paced(self, lane: _Lane, jobs: list[Job]) -> list[Job]:
        """The jobs every recipient of which may get a message now; the others wait (their
        due time moved, the attempt not counted) under NOTIFIER_SMS_RECIPIENT_LIMITS."""
        limits = self.settings.sms_recipient_limits
        if lane.name != "sms" or not jobs or not (limits or self._holding_until > utcnow()):
            return jobs
        deferred = await self.store.pace(self.owner, jobs, limits)
        for job_id, due in deferred.items():
            log.info("job %s: paced, a recipient is at its limit until %s", job_id, due)
        return [job for job in jobs if job.id not in deferred]

    async def _suppressed(self, lane: _Lane, jobs: list[Job]) -> dict[str, str]:
        """Suppressed addresses among the recipients of ``jobs`` (email), with the reason."""
        if lane.name != "email" or not jobs:
            return {}
        addresses = {a.lower() for job in jobs for a in envelope(job.pending_message())}
        return await self.store.suppressed(addresses)

    async def _deliver(self, lane: _Lane, job: Job, suppressed: Mapping[str, str]) -> None:
        started = time.monotonic()
        try:
            outcome = await self._attempt(lane.channel, job, suppressed)
        except BaseException:
            await asyncio.shield(self._release(job))
            lane.held.discard(job.id)
            raise
        finally:
            lane.in_flight.pop(job.id, None)
            lane.wake.set()
        elapsed = time.monotonic() - started
        try:
            applied = await asyncio.shield(self._recorder.put(outcome))
        except StoreUnavailable as exc:
            log.error(
                "job %s: %s, but the store stayed unreachable (%s); it stays leased and is "
                "taken up again after recovery (at least once)",
                job.id,
                outcome.status.value,
                exc,
            )
            return
        finally:
            lane.held.discard(job.id)
        if applied:
            self._observe(lane, job, outcome, elapsed)

    def _observe(self, lane: _Lane, job: Job, outcome: Outcome, elapsed: float) -> None:
        lane.metrics.attempt_seconds.observe(elapsed)
        lane.metrics.counters[outcome.status].inc()
        if outcome.status is JobStatus.DELIVERED:
            lane.metrics.age_seconds.observe((utcnow() - job.created_at).total_seconds())
        level = logging.WARNING if outcome.status is JobStatus.FAILED else logging.INFO
        if not log.isEnabledFor(level):
            return
        provider = lane.channel.provider
        log.log(
            level,
            "job %s %s via %s/%s, attempt %d, %.3fs%s",
            job.id,
            outcome.status.value,
            lane.name,
            provider,
            job.attempts,
            elapsed,
            f": {outcome.last_error}" if outcome.last_error else "",
            extra={
                "job_id": job.id,
                "channel": lane.name,
                "provider": provider,
                "attempt": job.attempts,
                "outcome": outcome.status.value,
                "seconds": round(elapsed, 4),
                "error": outcome.last_error,
            },
        )

    async def _attempt(self, channel: Channel, job: Job, suppressed: Mapping[str, str]) -> Outcome:
        message = job.pending_message()
        if suppressed:
            refused = _suppressed_recipients(message, suppressed)
            if refused:
                job = replace(job, results=_with_refused(job.results, refused))
                if len(refused) == len(envelope(message)):
                    return _nobody_left(job)
                message = replace(message, skip=(*message.skip, *refused))
        delivered: dict[str, Any] = dict(job.results.get("delivered", {}))
        try:
            receipt = await self._send(channel, job, message)
        except DeliveryError as error:
            await self._hold_throttled(error)
            return self._failed(job, error, delivered)
        return self._delivered(job, receipt, delivered)

    async def _send(self, channel: Channel, job: Job, message: Message) -> Receipt:
        """The channel's receipt; any failure as a DeliveryError saying whether to retry."""
        try:
            async with asyncio.timeout(self.settings.delivery_timeout):
                return await channel.send(message)
        except DeliveryError:
            raise
        except TimeoutError:
            timeout = self.settings.delivery_timeout
            raise DeliveryTimeout(f"no answer within {timeout:g}s") from None
        except Exception as exc:
            log.exception("job %s: channel %s raised unexpectedly", job.id, job.channel)
            raise TransientDeliveryError(f"internal error in channel: {exc!r}") from exc

    def _failed(self, job: Job, error: DeliveryError, delivered: dict[str, Any]) -> Outcome:
        delivered.update(error.delivered)
        results = {**job.results, "delivered": delivered} if delivered else job.results
        if error.providers:
            results["providers"] = {**job.results.get("providers", {}), **error.providers}
        if error.transient and job.attempts < self.settings.retry_max_attempts:
            wait = self.backoff.delay(job.attempts, error.retry_after)
            return Outcome(
                job.id,
                JobStatus.RETRYING,
                last_error=error.message,
                run_at=utcnow() + timedelta(seconds=wait),
                results=results,
            )
        if error.transient:
            reason = f"gave up after {job.attempts} attempts: {error.message}"
        else:
            reason = error.message
        return Outcome(job.id, JobStatus.FAILED, last_error=reason, results=results)

    async def _hold_throttled(self, error: DeliveryError) -> None:
        """A provider's "too often" for a number holds every job to it, not only this one."""
        waits = throttled(error)
        if not waits:
            return
        now = utcnow()
        holds = {
            number: now + timedelta(seconds=wait or THROTTLE_HOLD) for number, wait in waits.items()
        }
        self._holding_until = max(self._holding_until, *holds.values())
        try:
            await self.store.hold_recipients(holds)
        except StoreUnavailable as exc:
            log.warning("could not hold %d throttled numbers: %s", len(holds), exc)

    @staticmethod
    def _delivered(job: Job, receipt: Receipt, delivered: dict[str, Any]) -> Outcome:
        delivered.update(receipt.provider_ids)
        results: dict[str, Any] = {**job.results, "delivered": delivered}
        if receipt.provider_message_id is not None:
            results["provider_message_id"] = receipt.provider_message_id
        if receipt.refused:
            results = _with_refused(results, receipt.refused)
        if receipt.providers:
            results["providers"] = {**job.results.get("providers", {}), **receipt.providers}
        return Outcome(job.id, JobStatus.DELIVERED, results=results)

    async def _record(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Save outcomes, riding out a store outage for half a lease, or until shutdown's grace
        runs out: a delivery that happened must not be forgotten (if it is, the job is sent
        again after recovery: at least once)."""
        outlasted = tenacity.stop_after_delay(self.settings.lease_seconds / 2)
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(StoreUnavailable),
            wait=tenacity.wait_exponential(multiplier=0.1, max=5),
            stop=lambda state: outlasted(state) or self._abandoning.is_set(),
            sleep=self._pause,
            before_sleep=_outage_noticed,
            reraise=True,
        )
        applied: list[bool] = await retrying(self.store.record, self.owner, outcomes)
        for outcome, ok in zip(outcomes, applied, strict=True):
            if not ok:
                log.warning(
                    "job %s: outcome not recorded, the job was cancelled or taken over",
                    outcome.job_id,
                )
        return applied

    async def _pause(self, seconds: float) -> None:
        """tenacity's sleep between record attempts, cut short when shutdown gives up."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._abandoning.wait(), seconds)

    async def _release(self, *jobs: Job) -> None:
        try:
            await self.store.release(self.owner, [job.id for job in jobs])
        except StoreUnavailable as exc:
            log.warning("%d jobs: could not release (%s); recovered later", len(jobs), exc)

    async def _keep_leases(self) -> None:
        """Extend the leases of slow deliveries so no other instance takes them over."""
        interval = self.settings.lease_seconds / 3
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), interval)
            except TimeoutError:
                ids = [job_id for lane in self._lanes for job_id in lane.in_flight]
                if ids:
                    try:
                        await self.store.extend_leases(self.owner, ids, self.settings.lease_seconds)
                    except StoreUnavailable as exc:
                        log.warning("extending leases: store unavailable: %s", exc)


def _outage_noticed(state: tenacity.RetryCallState) -> None:
    """Say once per batch that outcomes wait on the store, not at every attempt."""
    if state.attempt_number == 1 and state.outcome is not None:
        log.warning(
            "recording outcomes: store unavailable (%s); retrying until it is back",
            state.outcome.exception(),
        )


def _nobody_left(job: Job) -> Outcome:
    """Every recipient still to serve is suppressed: the job ends here, delivered to those an
    earlier attempt served, failed if there were none."""
    if job.results.get("delivered"):
        return Outcome(job.id, JobStatus.DELIVERED, results=job.results)
    reason = "every recipient is suppressed (hard bounce or suppress op)"
    return Outcome(job.id, JobStatus.FAILED, last_error=reason, results=job.results)


def _suppressed_recipients(message: Message, suppressed: Mapping[str, str]) -> dict[str, str]:
    """The message's pending recipients (as the job spells them) that are suppressed."""
    return {
        recipient: f"suppressed: {suppressed[address.lower()]}"
        for address, recipient in envelope(message).items()
        if address.lower() in suppressed
    }


def _with_refused(results: dict[str, Any], refused: Mapping[str, str]) -> dict[str, Any]:
    return {**results, "refused": {**results.get("refused", {}), **refused}}
