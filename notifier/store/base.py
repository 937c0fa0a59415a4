"""The store interface: small verbs that every backend implements with the same guarantees.

A job moves ``queued``/``retrying`` -> ``sending`` (claimed under a lease by one owner) ->
``delivered`` | ``retrying`` | ``failed``; ``cancelled`` from any state that is not final.
Verbs that change jobs in flight name their ``owner``, and touch only the rows that owner
still holds, so an instance whose lease was taken over can never record twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Self

from notifier.models import (
    CallbackBacklog,
    Enqueued,
    Event,
    EventOutcome,
    Job,
    JobSearch,
    JobStatus,
    MinuteOutcomes,
    NewJob,
    Outcome,
    Priority,
    ReceiptReport,
    Suppression,
)

if TYPE_CHECKING:  # settings validate store URLs with this package's registry
    from notifier.settings import RecipientLimit, Settings


class StoreUnavailable(Exception):
    """The store cannot be reached or refused the operation; intake answers ``unavailable``."""


class StoreLocked(StoreUnavailable):
    """Another process already owns this embedded store."""


class Store(ABC):
    """A durable job queue.

    Listeners registered with ``on_work`` are called (synchronously, cheaply) whenever new
    work may be due, so idle dispatchers wake at once instead of on their next poll.
    """

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> Self:
        """The store ``settings.database_url`` names, not yet opened.

        Everything it needs comes from ``settings``: a store never reads the environment, so
        tests and tools can run several side by side. A URL it cannot use is a ValueError.
        """

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """Whether this instance alone may do ``name`` (read the bounce mailbox) for the block;
        an embedded store has one instance, so always."""
        yield True

    def on_work(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _notify_work(self) -> None:
        for listener in self._listeners:
            listener()

    @abstractmethod
    async def open(self) -> None:
        """Connect, create or migrate the schema, and take ownership where the backend needs it."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None:
        """Return if the store answers and can commit a write (readiness: a full disk still
        answers reads); raise StoreUnavailable otherwise."""

    @abstractmethod
    async def enqueue(self, jobs: Sequence[NewJob]) -> list[Enqueued]:
        """Store the jobs in one transaction, committed before this returns.

        A job whose idempotency key is already stored (or appears earlier in ``jobs``) is not
        stored again: its answer carries the first job's id with ``duplicate=True``.
        """

    @abstractmethod
    async def claim(
        self, channel: str, *, owner: str, limit: int, lease_seconds: float, oldest: int = 0
    ) -> list[Job]:
        """Take up to ``limit`` due jobs of ``channel``: status ``sending``, attempts + 1.

        ``oldest`` of them are the longest-waiting due jobs; the rest go in priority order
        (high, normal, low), each priority by due time. A claimed job's ``callback`` is None
        (delivery does not read it; ``get`` does).
        """

    @abstractmethod
    async def record(self, owner: str, outcomes: Sequence[Outcome]) -> list[bool]:
        """Save the outcomes in one transaction; each is applied only if ``owner`` still holds
        the job. Returns, per outcome, whether it was applied."""

    @abstractmethod
    async def extend_leases(self, owner: str, job_ids: Sequence[str], lease_seconds: float) -> None:
        """Keep slow deliveries from being taken over while the owner is alive."""

    @abstractmethod
    async def release(self, owner: str, job_ids: Sequence[str]) -> None:
        """Give jobs back to the queue, due now (shutdown cut their delivery short)."""

    @abstractmethod
    async def release_unheld(self, owner: str, channel: str, held: Collection[str]) -> int:
        """Give back, due now, the ``channel`` jobs ``owner`` holds but ``held`` does not name:
        a claim that committed but whose answer was lost (its connection died) left them
        leased to a live owner that does not know it has them. Returns how many."""

    @abstractmethod
    async def recover(self, *, owner: str) -> int:
        """Requeue work that no live owner holds (leases run out, or a dead predecessor's).

        Returns how many jobs went back to the queue.
        """

    @abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    async def cancel(self, job_id: str) -> Job | None:
        """Cancel the job unless it is final already; return it as it now stands."""

    @abstractmethod
    async def next_due(self, channel: str) -> datetime | None:
        """When the earliest waiting job of ``channel`` becomes due, or None if none waits."""

    @abstractmethod
    async def count_by_status(self) -> dict[JobStatus, int]:
        """Queue depth, for metrics and readiness."""

    @abstractmethod
    async def count_waiting(self) -> dict[tuple[str, Priority], int]:
        """Waiting jobs (queued or retrying, due or not) by channel and priority."""

    @abstractmethod
    async def list_jobs(
        self, *, status: JobStatus | None, since: datetime | None, limit: int
    ) -> list[Job]:
        """Jobs last changed at or after ``since``, most recently changed first."""

    @abstractmethod
    async def retry(self, *, job_ids: Sequence[str] | None, since: datetime | None) -> list[str]:
        """Requeue failed jobs (the given ones, or all failed since ``since``) with a fresh
        attempt budget; recipients already served stay served. Returns the requeued ids."""

    @abstractmethod
    async def purge(self, *, before: datetime) -> int:
        """Delete finished jobs last changed before ``before``; returns how many."""

    # -- traffic control ---------------------------------------------------------------------

    @abstractmethod
    async def pace(
        self, owner: str, jobs: Sequence[Job], limits: Sequence[RecipientLimit]
    ) -> dict[str, datetime]:
        """Admit claimed jobs whose every pending recipient is under each limit and not held,
        counting their sends; give the others back to the queue, due when their recipients
        may get a message again, their attempt not counted. Returns the deferred ids with
        their new due time. Race-free across instances sharing the store."""

    @abstractmethod
    async def hold_recipients(self, holds: Mapping[str, datetime]) -> None:
        """No job to these recipients is admitted by ``pace`` before the given time (a
        provider answered "too often")."""

    # -- suppression -------------------------------------------------------------------------

    @abstractmethod
    async def suppressed(self, addresses: Collection[str]) -> dict[str, str]:
        """Those of ``addresses`` (bare, lower case) that are suppressed, with the reason."""

    @abstractmethod
    async def suppress(self, address: str, reason: str) -> None:
        """Suppress ``address`` (bare, lower case); an existing entry keeps its first reason."""

    @abstractmethod
    async def unsuppress(self, address: str) -> bool:
        """Lift the suppression; False if there was none."""

    @abstractmethod
    async def list_suppressions(self) -> list[Suppression]: ...

    # -- callbacks and receipts --------------------------------------------------------------

    @abstractmethod
    async def claim_events(self, *, owner: str, limit: int, lease_seconds: float) -> list[Event]:
        """Take up to ``limit`` due callback events under a lease, oldest first.

        Events are written by the store itself, in the transaction that finishes a job (one
        ``job.final`` per job with a callback URL) or changes a recipient's receipt
        (``job.receipt``).
        """

    @abstractmethod
    async def record_events(self, owner: str, outcomes: Sequence[EventOutcome]) -> None:
        """Save what became of posted events (sent, retry at ``run_at``, given up)."""

    @abstractmethod
    async def record_receipts(self, reports: Sequence[ReceiptReport]) -> list[bool]:
        """Record per-recipient receipts; per report, whether it matched a job.

        A report whose provider id is not known yet is kept and applied when the delivery
        that carries that id is recorded; a hard bounce (status 5.x.x) suppresses the address.
        """

    # -- dashboard ---------------------------------------------------------------------------

    @abstractmethod
    async def search_jobs(self, search: JobSearch) -> list[Job]:
        """Jobs matching ``search``, newest first; each criterion reads an index."""

    @abstractmethod
    async def recent_failures(self, limit: int) -> list[Job]:
        """Jobs failed for good or for now (retrying), most recently changed first; a
        partial index holds just those."""

    @abstractmethod
    async def outcomes_per_minute(self, since: datetime) -> list[MinuteOutcomes]:
        """Delivered and failed jobs per minute since ``since``, by when they finished
        (their latest change), oldest minute first; minutes without any are left out."""

    @abstractmethod
    async def callback_backlog(self) -> CallbackBacklog:
        """Callback events not yet posted (pending, due or not)."""
