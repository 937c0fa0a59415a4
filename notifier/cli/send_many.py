"""``notifier send-many FILE``: send every row of a CSV or JSON-lines file as a job.

Every row is checked first, with the protocol's own model (as the client checks a job before
sending it), so that a mistake in row 9,000 sends nothing rather than half of the file. The
rest goes through ``Client.send_many``, pipelined. Each row's idempotency key comes from the
file's absolute path and the row's content (and, for identical rows, how many came before
it), so running the same file again, after an interruption or after fixing the rows that were
refused, sends only what the server does not hold yet.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from notifier import Client, JobInfo, JobStatus
from notifier.cli.client import _connection_options, _fail, _handler, _table
from notifier.protocol import SendRequest, describe_validation_error

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: Rows per ``send_many`` call: how often the progress moves.
CHUNK = 500
#: Seconds between two progress lines when stderr is not a terminal.
LINE_INTERVAL = 2.0
_DATA = "data."
#: CSV columns are send fields, or ``data.NAME`` for the template's data.
_COLUMNS = frozenset(SendRequest.model_fields) - {"op", "token", "data"}
_RECIPIENT_COLUMNS = ("to", "cc", "bcc", "reply_to")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "send-many",
        parents=[_connection_options()],
        help="send every row of a CSV or JSON-lines file as a job",
        description=send_many.__doc__,
    )
    parser.set_defaults(handler=_handler(send_many))
    parser.add_argument("file", type=Path, help="a .csv file with a header row, or .jsonl")
    parser.add_argument("--format", choices=("csv", "jsonl"), help="instead of the extension's")
    parser.add_argument(
        "--skip-invalid", action="store_true", help="send the valid rows even if some are not"
    )
    parser.add_argument(
        "--wait", action="store_true", help="wait until every job is final, then summarise"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="with --wait: how long to wait for them all (default: %(default)s)",
    )


class BadFile(ValueError):
    """The file as a whole cannot be read as jobs (as opposed to one bad row)."""


@dataclass(slots=True)
class Row:
    line: int
    job: dict[str, Any]
    error: str | None = None


def send_many(client: Client, args: argparse.Namespace) -> int:
    """Send every row of a CSV file (a header row of send fields such as channel, to, text,
    template, and data.NAME columns for the template's data) or of a JSON-lines file (one
    job object per line). Every row is checked before any is sent; running the file again
    sends only the rows not stored yet."""
    try:
        rows = load(args.file, args.format)
    except BadFile as exc:
        return _fail("invalid_request", str(exc), status=2)
    invalid = [row for row in rows if row.error is not None]
    for row in invalid:
        print(f"{args.file}:{row.line}: {row.error}", file=sys.stderr)
    if invalid and not args.skip_invalid:
        return _fail(
            "invalid_request",
            f"{len(invalid)} of {len(rows)} rows are invalid; nothing was sent "
            "(--skip-invalid sends the others)",
        )
    valid = [row for row in rows if row.error is None]
    try:
        return _deliver(client, args, valid, _meter())
    except KeyboardInterrupt:
        message = "run the same command again: it sends only what is left"
        return _fail("interrupted", message, status=130)


def load(path: Path, kind: str | None = None) -> list[Row]:
    """The rows of the file, each checked and given its idempotency key."""
    kind = kind or FORMATS.get(path.suffix.lower())
    if kind is None:
        raise BadFile(f"{path}: cannot tell the format from the extension; give --format")
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            rows = list(_csv_rows(file) if kind == "csv" else _jsonl_rows(file))
    except OSError as exc:
        raise BadFile(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BadFile(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise BadFile(f"{path}: not valid CSV: {exc}") from None
    _prepare(rows, str(path.resolve()))
    return rows


def _csv_rows(file: IO[str]) -> Iterator[Row]:
    reader = csv.reader(file, strict=True)
    columns = _columns(next(reader, None))
    start = reader.line_num + 1
    for cells in reader:
        if len(cells) != len(columns):
            if cells:  # a blank line is no row
                error = f"{len(cells)} cells, but the header has {len(columns)} columns"
                yield Row(start, {}, error)
        else:
            yield Row(start, _csv_job(columns, cells))
        start = reader.line_num + 1


def _columns(header: list[str] | None) -> list[str]:
    if header is None:
        raise BadFile("the file is empty; a CSV file starts with a header row of field names")
    columns = [name.strip() for name in header]
    for name in columns:
        if name not in _COLUMNS and not (name.startswith(_DATA) and name != _DATA):
            known = ", ".join(sorted(_COLUMNS))
            raise BadFile(f"line 1: unknown column {name!r}: use {known} or data.NAME")
    if repeated := [name for name, n in Counter(columns).items() if n > 1]:
        raise BadFile(f"line 1: repeated column(s): {', '.join(repeated)}")
    return columns


def _csv_job(columns: list[str], cells: list[str]) -> dict[str, Any]:
    """Empty cells are left out; a recipient cell may list several, separated by ``;``."""
    job: dict[str, Any] = {}
    data: dict[str, str] = {}
    for name, cell in zip(columns, cells, strict=True):
        if not cell:
            continue
        if name.startswith(_DATA):
            data[name.removeprefix(_DATA)] = cell
        elif name in _RECIPIENT_COLUMNS:
            job[name] = [part.strip() for part in cell.split(";") if part.strip()]
        else:
            job[name] = cell
    if data:
        job["data"] = data
    return job


def _jsonl_rows(file: IO[str]) -> Iterator[Row]:
    for number, text in enumerate(file, start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            yield Row(number, {}, f"not valid JSON: {exc}")
            continue
        if isinstance(value, dict):
            yield Row(number, {k: v for k, v in value.items() if v is not None})
        else:
            yield Row(number, {}, "must be a JSON object (one job per line)")


def _prepare(rows: Iterable[Row], file_identity: str) -> None:
    """Give each good row its idempotency key, then check it as the server will."""
    seen: Counter[str] = Counter()
    for row in rows:
        if row.error is not None:
            continue
        content = json.dumps(row.job, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        digest = hashlib.sha256(f"{file_identity}\0{seen[content]}\0{content}".encode())
        seen[content] += 1
        row.job.setdefault("idempotency_key", f"send-many:{digest.hexdigest()}")
        try:
            SendRequest.model_validate(row.job)
        except ValidationError as exc:
            row.error = describe_validation_error(exc)


def _deliver(client: Client, args: argparse.Namespace, rows: list[Row], meter: Meter) -> int:
    """Send in chunks, so that the progress moves, and name each refused row by its line."""
    sent: list[tuple[Row, str]] = []
    duplicates = refused = 0
    with meter.step("sending", len(rows)) as advance:
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            results = client.send_many([row.job for row in chunk])
            for row, result in zip(chunk, results, strict=True):
                if result.error is not None:
                    refused += 1
                    error = f"{result.error.code}: {result.error.message}"
                    print(f"{args.file}:{row.line}: {error}", file=sys.stderr)
                else:
                    assert result.id is not None
                    sent.append((row, result.id))
                    duplicates += result.duplicate
            advance(len(chunk))
    print(f"stored {len(sent) - duplicates} new job(s), {duplicates} already stored "
          f"(duplicates), {refused} refused")  # fmt: skip
    if not args.wait:
        return 1 if refused else 0
    finals = _wait(client, sent, args.timeout, meter)
    return 1 if _summarise(finals) or refused else 0


def _wait(
    client: Client, sent: list[tuple[Row, str]], timeout: float, meter: Meter
) -> list[tuple[Row, JobInfo]]:
    """Each job's final state, all within ``timeout``; TimeoutError past it."""
    deadline = time.monotonic() + timeout
    finals = []
    with meter.step("waiting", len(sent)) as advance:
        for row, job_id in sent:
            remaining = max(deadline - time.monotonic(), 0.0)
            try:
                finals.append((row, client.wait(job_id, timeout=remaining)))
            except TimeoutError:
                left = len(sent) - len(finals)
                message = f"{left} of {len(sent)} jobs not final after {timeout:g}s"
                raise TimeoutError(message) from None
            advance(1)
    return finals


def _summarise(finals: list[tuple[Row, JobInfo]]) -> int:
    """Print the counts by status and the jobs not delivered; return how many those are."""
    counts = Counter(info.status.value for _, info in finals)
    _table(("status", "jobs"), [{"status": s, "jobs": n} for s, n in sorted(counts.items())])
    undelivered = [
        {
            "line": row.line,
            "id": info.id,
            "status": info.status.value,
            "last_error": info.last_error,
        }
        for row, info in finals
        if info.status is not JobStatus.DELIVERED
    ]
    if undelivered:
        print()
        _table(("line", "id", "status", "last_error"), undelivered)
    return len(undelivered)


Advance = Callable[[int], None]


class Meter(Protocol):
    """Progress, one step at a time (sending, then waiting)."""

    def step(self, what: str, total: int) -> AbstractContextManager[Advance]: ...


def _meter() -> Meter:
    return _Bar() if sys.stderr.isatty() else _Lines(sys.stderr)


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.finished_time or task.elapsed
        rate = f"{task.completed / elapsed:,.0f} rows/s" if elapsed else ""
        return Text(rate, style="progress.data.speed")


class _Bar:
    """On a terminal: a bar with the count, the rate and the time left."""

    @contextmanager
    def step(self, what: str, total: int) -> Iterator[Advance]:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(
            *columns, _Rate(), TimeRemainingColumn(), console=Console(stderr=True)
        ) as progress:
            task = progress.add_task(what, total=total)
            yield lambda done: progress.advance(task, done)


class _Lines:
    """For logs and pipes: a plain line every few seconds and one at the end, no escapes."""

    def __init__(self, file: IO[str]) -> None:
        self._file = file

    @contextmanager
    def step(self, what: str, total: int) -> Iterator[Advance]:
        started = last = time.monotonic()
        count = 0

        def advance(done: int) -> None:
            nonlocal count, last
            count += done
            if count < total and time.monotonic() - last >= LINE_INTERVAL:
                last = time.monotonic()
                self._print(what, count, total, last - started)

        try:
            yield advance
        finally:
            self._print(what, count, total, time.monotonic() - started)

    def _print(self, what: str, count: int, total: int, elapsed: float) -> None:
        rate = count / elapsed if elapsed > 0 else 0.0
        left = f"{(total - count) / rate:.0f}s" if rate else "?"
        print(f"{what}: {count}/{total} rows, {rate:,.0f} rows/s, {left} left",
              file=self._file, flush=True)  # fmt: skip
