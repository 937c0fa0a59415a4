"""What the SQL backends share: the job columns, the status groups, rows read back as Jobs.

Both stores keep one ``jobs`` table with the same columns; they differ only in how a moment
is stored (SQLite: epoch seconds; PostgreSQL: ``timestamptz``) and in the SQL that writes.
A column added to ``JOB_COLUMNS`` and to ``Job`` is read back by both stores; each still adds
it to its schema and to the statements that write it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from notifier.models import (
    FINAL_STATUSES,
    Event,
    Job,
    JobSearch,
    JobStatus,
    Message,
    MinuteOutcomes,
    Priority,
    ReceiptReport,
    ReceiptState,
    bare_address,
    isoformat,
)

#: What every read of a job returns, in this order (``SELECT {COLUMNS}``, ``RETURNING
#: {COLUMNS}``); each is read into the ``Job`` field of the same name, so a new column of
#: ``jobs`` that a Job carries is read back by both stores once it is named here.
JOB_COLUMNS: tuple[str, ...] = (
    "id",
    "channel",
    "status",
    "message",
    "attempts",
    "last_error",
    "results",
    "idempotency_key",
    "created_at",
    "updated_at",
    "run_at",
    "priority",
    "superseded_by",
    "receipts",
    "callback",
)
#: Of those, the ones each backend stores moments in its own way.
MOMENT_COLUMNS: tuple[str, ...] = ("created_at", "updated_at", "run_at")

#: Jobs a dispatcher may claim once they are due.
WAITING_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RETRYING})


def status_in(statuses: Iterable[JobStatus], column: str = "status") -> str:
    """``status IN (...)``, in the enum's order so that a statement's text never varies.

    The partial indexes are built on these conditions (SQLite uses one only when the query
    repeats its condition), so queries and schemas take them from here.
    """
    wanted = frozenset(statuses)
    values = ", ".join(f"'{s.value}'" for s in JobStatus if s in wanted)
    return f"{column} IN ({values})"


def job_columns(json_object: str | None) -> str:
    """``JOB_COLUMNS`` as a select list; ``callback`` is derived from the job's latest event
    (``json_object`` names the backend's function that builds a JSON object), or is NULL
    when ``json_object`` is None: claims leave it out, delivery never reads it and it costs
    a subquery per job."""
    if json_object is None:
        return ", ".join("NULL" if name == "callback" else f"jobs.{name}" for name in JOB_COLUMNS)
    latest = (
        f"(SELECT {json_object}('state', e.state, 'attempts', e.attempts,"
        " 'last_error', e.last_error) FROM events e WHERE e.job_id = jobs.id"
        " ORDER BY e.created_at DESC LIMIT 1)"
    )
    none_yet = f"{json_object}('state', 'pending', 'attempts', 0, 'last_error', NULL)"
    callback = (
        f"CASE WHEN jobs.callback_url IS NULL THEN NULL ELSE coalesce({latest}, {none_yet}) END"
    )
    return ", ".join(
        f"{callback} AS callback" if name == "callback" else f"jobs.{name}" for name in JOB_COLUMNS
    )


#: What a claim returns: every column but the callback state.
CLAIMED_COLUMNS = job_columns(None)

WAITING = status_in(WAITING_STATUSES)
FINAL = status_in(FINAL_STATUSES)
#: Jobs that failed, for good or for now: few, in their own index for the dashboard.
FAILING = status_in({JobStatus.RETRYING, JobStatus.FAILED})

#: ``last_error`` of a job given back to the queue by a stopping instance.
INTERRUPTED_BY_SHUTDOWN = "delivery interrupted by shutdown; it will be tried again"
CLAIM_ANSWER_LOST = "the claim's answer was lost before delivery began; it will be tried again"


def _as_stored(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class JobRows:
    """How one backend's rows read back as Jobs.

    ``moment`` turns a stored timestamp (``MOMENT_COLUMNS``) into an aware datetime, and
    ``document`` a stored JSON document (``message``, ``results``) into Python, both as the
    backend's driver hands them over. Every other column goes to its field as it is.
    """

    moment: Callable[[Any], datetime] = _as_stored
    document: Callable[[Any], Any] = json.loads

    def job(self, row: Iterable[Any]) -> Job:
        """A row of ``JOB_COLUMNS``: a tuple, or an asyncpg Record (which iterates its values)."""
        value = dict(zip(JOB_COLUMNS, row, strict=True))
        for name in MOMENT_COLUMNS:
            value[name] = self.moment(value[name])
        value["status"] = JobStatus(value["status"])
        message = self.document(value["message"])
        value["message"] = Message.from_dict(value["id"], value["channel"], message)
        value["results"] = self.document(value["results"]) if value["results"] else {}
        value["priority"] = Priority.of_rank(value["priority"])
        receipts = self.document(value["receipts"]) if value["receipts"] else {}
        value["receipts"] = {key: receipt_entry(entry) for key, entry in receipts.items()}
        value["callback"] = self.document(value["callback"]) if value["callback"] else None
        return Job(**value)


def receipt_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A stored receipt in the answer's shape (a JSON merge patch cannot store a null)."""
    return {"state": entry["state"], "reason": entry.get("reason"), "at": entry["at"]}


def receipt_patch(recipient: str, report: ReceiptReport) -> dict[str, Any]:
    return {
        recipient: {
            "state": report.state.value,
            "reason": report.reason,
            "at": isoformat(report.at),
        }
    }


def same_receipt(current: dict[str, Any] | None, report: ReceiptReport) -> bool:
    """A repeat of what is known already (providers resend reports) changes nothing."""
    return (
        current is not None
        and current.get("state") == report.state.value
        and current.get("reason") == report.reason
    )


def _digits(value: str) -> str:
    return "".join(c for c in value if c.isdigit())


def match_recipient(candidates: Iterable[str], given: str | None) -> str | None:
    """The job's spelling of the recipient a provider names: an address in any case or
    display name, a number in E.164 or the national form (ihuyi reports ``138...``)."""
    spelled = list(dict.fromkeys(candidates))
    if given is None:
        return spelled[0] if len(spelled) == 1 else None
    if given in spelled:
        return given
    if "@" in given:
        wanted = given.strip().lower()
        return next((c for c in spelled if "@" in c and bare_address(c) == wanted), None)
    digits = _digits(given)
    for candidate in spelled:
        theirs = _digits(candidate)
        if digits and theirs and (theirs.endswith(digits) or digits.endswith(theirs)):
            return candidate
    return None


def is_hard_bounce(report: ReceiptReport) -> bool:
    """A permanent failure (RFC 3463 class 5) of a mailbox: the address is suppressed."""
    return report.state is ReceiptState.BOUNCED and (report.reason or "").startswith("5.")


def waiting_counts(rows: Iterable[Iterable[Any]]) -> dict[tuple[str, Priority], int]:
    """``(channel, priority rank, count)`` rows by channel and priority."""
    return {(channel, Priority.of_rank(rank)): int(n) for channel, rank, n in rows}


#: The statement behind ``count_waiting``; it reads the priority index only.
COUNT_WAITING = (
    f"SELECT channel, priority, count(*) FROM jobs WHERE {WAITING} GROUP BY channel, priority"
)


def status_counts(rows: Iterable[Iterable[Any]]) -> dict[JobStatus, int]:
    """Every status with its count from ``(status, count)`` rows; statuses without a row at 0."""
    counts = dict.fromkeys(JobStatus, 0)
    counts.update({JobStatus(status): int(n) for status, n in rows})
    return counts


def claim_order(due: str, *, oldest: str | None, limit: str, lock: str = "") -> str:
    """The ids a claim takes: the ``oldest`` longest-waiting due jobs whatever their priority
    (none when it is None), then due jobs in priority order, each priority by due time,
    ``limit`` in all.

    ``due`` is ``FROM jobs WHERE <due work of the channel>``. Each priority is its own range
    of the index (channel, priority, run_at, id), read in order up to the limit, and the
    longest-waiting share the first ``oldest`` of those ranges merged by due time: a claim
    reads about as many index entries as it takes, however many jobs wait for later, and
    needs no second index in (channel, run_at) order that a planner could walk instead,
    past every waiting job of the other priorities. One walk of the whole channel in
    priority order would step over every job not yet due of a priority before the next.
    """
    ranks = _priority_ranges(due, limit, lock)
    if oldest is None:
        return f"SELECT id FROM ({ranks}) AS p ORDER BY priority, run_at, id LIMIT {limit}"
    return (
        "SELECT id FROM ("
        f"SELECT id, 0 AS part, row_number() OVER (ORDER BY run_at, id) AS rn FROM"
        f" (SELECT id, run_at FROM ({_priority_ranges(due, oldest, lock)}) AS r"
        f" ORDER BY run_at, id LIMIT {oldest}) AS o"
        " UNION ALL"
        f" SELECT id, 1, row_number() OVER (ORDER BY priority, run_at, id) FROM ({ranks}) AS p)"
        f" AS chosen GROUP BY id ORDER BY min(part), min(rn) LIMIT {limit}"
    )


def _priority_ranges(due: str, limit: str, lock: str) -> str:
    """The first ``limit`` due jobs of each priority, each read from its own index range."""
    return " UNION ALL ".join(
        f"SELECT * FROM (SELECT id, priority, run_at {due} AND priority = {p.rank}"
        f" ORDER BY run_at, id LIMIT {limit}{lock}) AS p{p.rank}"
        for p in Priority
    )


def in_claim_order(jobs: Iterable[Job]) -> list[Job]:
    """Claimed jobs in the order they are due to go: priority, then due time."""
    return sorted(jobs, key=lambda job: (job.priority.rank, job.run_at, job.id))


def recipients_of(message: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """Every recipient a stored job names (as it spells them), served ones first."""
    named = [*message.get("to", ()), *message.get("cc", ()), *message.get("bcc", ())]
    return [*results.get("delivered", {}), *named]


def events(
    rows: Iterable[Iterable[Any]], jobs: dict[str, Job], moment: Callable[[Any], datetime]
) -> list[Event]:
    """Claimed ``(id, job_id, type, url, created_at, attempts)`` rows with their jobs; an
    event whose job was purged meanwhile has nothing left to report and is left out."""
    claimed = []
    for event_id, job_id, kind, url, created_at, attempts in rows:
        if job_id in jobs:
            claimed.append(Event(event_id, kind, url, moment(created_at), attempts, jobs[job_id]))
    return claimed


def search_where(
    search: JobSearch,
    param: Callable[[Any], str],
    *,
    recipient: str,
    moment: Callable[[datetime], Any],
) -> str:
    """The condition of a dashboard search, from the criteria it gives.

    ``param`` binds a value and returns its placeholder; ``recipient`` is the backend's
    expression of the ``jobs_recipient`` index; ``moment`` stores a datetime as the backend
    does. Only given criteria appear, so each reads its index (the primary key, the
    idempotency key's, ``jobs_recipient``, ``jobs_created``).
    """
    created_from, created_until = search.created_from, search.created_until
    criteria: list[tuple[str, Any]] = [
        ("id = {}", search.job_id),
        ("idempotency_key = {}", search.idempotency_key),
        (f"{recipient} = lower({{}})", search.recipient),
        ("status = {}", search.status and search.status.value),
        ("created_at >= {}", created_from and moment(created_from)),
        ("created_at < {}", created_until and moment(created_until)),
    ]
    given = [condition.format(param(value)) for condition, value in criteria if value is not None]
    return " AND ".join(given) or "true"


#: The statement behind ``outcomes_per_minute``, over the ``jobs_finished`` index; ``{minute}``
#: is the backend's start of the minute of ``updated_at``, ``{since}`` its placeholder.
OUTCOMES_PER_MINUTE = (
    "SELECT {minute} AS minute, sum(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END),"
    " sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END)"
    f" FROM jobs WHERE {FINAL} AND updated_at >= {{since}} GROUP BY minute ORDER BY minute"
)


def minute_outcomes(
    rows: Iterable[Iterable[Any]], moment: Callable[[Any], datetime]
) -> list[MinuteOutcomes]:
    """``(minute, delivered, failed)`` rows; a minute of only cancelled jobs is left out."""
    return [
        MinuteOutcomes(moment(minute), int(delivered), int(failed))
        for minute, delivered, failed in rows
        if delivered or failed
    ]


#: The statement behind ``callback_backlog``; it reads the ``events_due`` index.
CALLBACK_BACKLOG = "SELECT count(*), min(created_at) FROM events WHERE state = 'pending'"
