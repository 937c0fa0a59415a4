"""The admin rules that the protocol (``handler``) and the dashboard both apply.

One place decides what may be retried or cancelled and what the refusal says, so an operator
gets the same answer from ``notifier retry`` as from the dashboard's button; and one limit
per token (``NOTIFIER_ADMIN_RATE_LIMIT``) covers the ops that requeue or delete, whichever
surface they come through, so a leaked token or a runaway script churns the queue only so fast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from notifier.errors import InvalidRequest, NotFound, RateLimited
from notifier.models import Job
from notifier.receipts import AddressBuckets
from notifier.settings import RecipientLimit
from notifier.store import Store


def found(job: Job | None) -> Job:
    if job is None:
        raise NotFound("id: no such job")
    return job


async def retry_job(store: Store, job_id: str) -> list[str]:
    """Requeue one failed job; nothing else is retried (a delivered job sent again would
    reach its recipients twice)."""
    ids = await store.retry(job_ids=[job_id], since=None)
    if not ids:
        job = found(await store.get(job_id))
        raise InvalidRequest(f"id: job is {job.status.value}; only failed jobs are retried")
    return ids


async def cancel_job(store: Store, job_id: str) -> Job:
    """Cancel the job unless it is final already; the job as it now stands."""
    return found(await store.cancel(job_id))


class AdminLimit:
    """Per caller (``"token 2"``), how fast the ops that requeue or delete may come."""

    def __init__(
        self, limit: RecipientLimit | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self._buckets = (
            AddressBuckets(limit.count / limit.seconds, limit.count, clock=clock)
            if limit is not None
            else None
        )

    def admit(self, op: str, caller: str) -> None:
        """Raise ``RateLimited`` (nothing done) when ``caller`` is over the limit."""
        if self._buckets is None:
            return
        wait = self._buckets.wait(caller)
        if wait:
            raise RateLimited(
                f"{op}: {caller} went over {self.limit} retry, purge and unsuppress ops"
                f" (NOTIFIER_ADMIN_RATE_LIMIT); nothing was done, try again in {math.ceil(wait)}s"
            )
