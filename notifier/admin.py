"""The admin rules that the protocol (``handler``) and the dashboard both apply.

One place decides what may be retried or cancelled and what the refusal says, so an operator
gets the same answer from ``notifier retry`` as from the dashboard's button.
"""

from __future__ import annotations

from notifier.errors import InvalidRequest, NotFound
from notifier.models import Job
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
