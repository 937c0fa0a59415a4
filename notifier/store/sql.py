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

from notifier.models import FINAL_STATUSES, Job, JobStatus, Message

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
)
COLUMNS = ", ".join(JOB_COLUMNS)
#: Of those, the ones each backend stores moments in its own way.
MOMENT_COLUMNS: tuple[str, ...] = ("created_at", "updated_at", "run_at")

#: Jobs a dispatcher may claim once they are due.
WAITING_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RETRYING})


def status_in(statuses: Iterable[JobStatus]) -> str:
    """``status IN (...)``, in the enum's order so that a statement's text never varies.

    The partial indexes are built on these conditions (SQLite uses one only when the query
    repeats its condition), so queries and schemas take them from here.
    """
    wanted = frozenset(statuses)
    return "status IN ({})".format(", ".join(f"'{s.value}'" for s in JobStatus if s in wanted))


WAITING = status_in(WAITING_STATUSES)
FINAL = status_in(FINAL_STATUSES)

#: ``last_error`` of a job given back to the queue by a stopping instance.
INTERRUPTED_BY_SHUTDOWN = "delivery interrupted by shutdown; it will be tried again"


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
        return Job(**value)


def status_counts(rows: Iterable[Iterable[Any]]) -> dict[JobStatus, int]:
    """Every status with its count from ``(status, count)`` rows; statuses without a row at 0."""
    counts = dict.fromkeys(JobStatus, 0)
    counts.update({JobStatus(status): int(n) for status, n in rows})
    return counts
