"""``notifier send``, ``status``, ``cancel``, ``ping`` and the admin commands ``jobs``,
``retry``, ``purge``, ``suppressions``, ``suppress`` and ``unsuppress``: the command-line
client, built on the public ``notifier.Client`` only.

The admin commands talk to the running service over its protocol (behind the same auth), so
they work the same against a container as locally.

They find the server as the Python client does: ``--host``, ``--port``, ``--token`` and
``--ca-file`` default to ``NOTIFIER_HOST``, ``NOTIFIER_PORT``, ``NOTIFIER_TOKEN`` and
``NOTIFIER_CA_FILE``. Results go to stdout; every failure goes to stderr as
``error: <code>: <message>``, with exit status 1 (2 for bad arguments or settings), so
scripts can tell them apart without parsing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from notifier import Client, JobStatus, NotifierError

Command = Callable[[Client, argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    connection = _connection_options()

    def add(name: str, command: Command, summary: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name, parents=[connection], help=summary, description=command.__doc__
        )
        parser.set_defaults(handler=_handler(command))
        return parser

    _send_options(add("send", _send, "send an email or SMS job and print its id"))
    status = add("status", _status, "show a job's status")
    status.add_argument("id", help="the job id that send printed")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    cancel = add("cancel", _cancel, "cancel a job not delivered yet")
    cancel.add_argument("id", help="the job id that send printed")
    add("ping", _ping, "check that the server answers")
    jobs = add("jobs", _jobs, "list jobs, newest change first")
    jobs.add_argument("--status", choices=[s.value for s in JobStatus], help="only this status")
    jobs.add_argument("--since", metavar="WHEN", help="changed since: 1h, 30m, 2d or RFC 3339")
    jobs.add_argument("--limit", type=int, default=100, help="at most this many (%(default)s)")
    jobs.add_argument("--json", action="store_true", help="one JSON object per line")
    retry = add("retry", _retry, "requeue failed jobs")
    retry.add_argument("id", nargs="?", help="the failed job to requeue")
    retry.add_argument(
        "--failed", action="store_true", help="requeue every job failed since --since"
    )
    retry.add_argument("--since", metavar="WHEN", help="with --failed: 1h, 2d or RFC 3339")
    purge = add("purge", _purge, "delete finished jobs older than a duration")
    purge.add_argument("--older-than", required=True, metavar="AGE", help="30d, 12h, ...")
    listing = add("suppressions", _suppressions, "list the addresses email is not sent to")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    suppress = add("suppress", _suppress, "stop sending email to an address")
    suppress.add_argument("address", help="the email address")
    suppress.add_argument("--reason", help="why, for whoever lists the suppressions later")
    unsuppress = add("unsuppress", _unsuppress, "send email to a suppressed address again")
    unsuppress.add_argument("address", help="the email address")


def _connection_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("connection")
    group.add_argument("--host", help="server host (default: $NOTIFIER_HOST, else 127.0.0.1)")
    group.add_argument("--port", type=int, help="server port (default: $NOTIFIER_PORT, else 7725)")
    group.add_argument("--token", help="auth token (default: $NOTIFIER_TOKEN)")
    group.add_argument(
        "--ca-file",
        type=Path,
        metavar="FILE",
        help="CA certificate(s) to trust; connects with TLS (default: $NOTIFIER_CA_FILE)",
    )
    group.add_argument(
        "--retry-timeout",
        type=float,
        metavar="SECONDS",
        help="how long to keep reconnecting to an unreachable server (default: the Python "
        "client's, 10)",
    )
    return parser


def _send_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channel", required=True, help="email or sms")
    parser.add_argument(
        "--to",
        action="append",
        required=True,
        metavar="RECIPIENT",
        help="an email address or phone number; repeat for several",
    )
    parser.add_argument("--subject", help="email subject")
    parser.add_argument("--text", help="plain-text body; the SMS text")
    parser.add_argument("--html", help="HTML body (email)")
    for name in ("--cc", "--bcc", "--reply-to"):
        parser.add_argument(name, action="append", metavar="ADDRESS", help="email; repeatable")
    parser.add_argument("--template", metavar="NAME", help="a template on the server")
    data = parser.add_mutually_exclusive_group()
    data.add_argument(
        "--data",
        type=_json_object,
        metavar="JSON",
        help='template variables as a JSON object, e.g. \'{"name": "Ada"}\'',
    )
    data.add_argument(
        "--data-file",
        dest="data",
        type=_json_file,
        metavar="FILE",
        help="template variables from a JSON file (- for stdin)",
    )
    parser.add_argument("--send-at", metavar="RFC3339", help="deliver no earlier than this")
    parser.add_argument("--idempotency-key", metavar="KEY", help="send at most once per key")
    parser.add_argument(
        "--priority", choices=("high", "normal", "low"), help="order among due jobs (normal)"
    )
    parser.add_argument(
        "--collapse-key", metavar="KEY", help="supersede older unsent jobs with this key"
    )
    parser.add_argument(
        "--callback-url", metavar="URL", help="where the job's events are POSTed (http/https)"
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait until the job is delivered; exit 1 if it fails or is cancelled",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --wait: how long to wait (default: %(default)s)",
    )


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _json_file(name: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {name}: {exc.strerror}") from None
    return _json_object(text)


def _handler(command: Command) -> Callable[[argparse.Namespace], int]:
    """Run ``command`` with a client, turning every failure into ``error: code: message``."""

    def handle(args: argparse.Namespace) -> int:
        retry = {} if args.retry_timeout is None else {"retry_timeout": args.retry_timeout}
        try:
            client = Client(args.host, args.port, args.token, ca_file=args.ca_file, **retry)
        except (ValueError, OSError) as exc:
            return _fail("settings", str(exc), status=2)
        try:
            with client:
                return command(client, args)
        except NotifierError as exc:
            return _fail(exc.code, exc.message)
        except TimeoutError as exc:
            return _fail("timeout", str(exc))

    return handle


def _fail(code: str, message: str, *, status: int = 1) -> int:
    print(f"error: {code}: {message}", file=sys.stderr)
    return status


#: The options of ``send`` that are fields of the job, under the protocol's names.
_FIELDS = (
    "subject", "text", "html", "cc", "bcc", "reply_to", "template", "data", "send_at",
    "idempotency_key", "priority", "collapse_key", "callback_url",
)  # fmt: skip


def _send(client: Client, args: argparse.Namespace) -> int:
    """Store a job on the server and print its id once it is stored durably."""
    job_id = client.send(args.channel, args.to, **{name: getattr(args, name) for name in _FIELDS})
    print(job_id, flush=True)
    if not args.wait:
        return 0
    info = client.wait(job_id, timeout=args.timeout)
    if info.status is not JobStatus.DELIVERED:
        reason = info.last_error or f"the job was {info.status.value}"
        return _fail(info.status.value, reason)
    print(f"job {job_id}: delivered", file=sys.stderr)
    return 0


def _status(client: Client, args: argparse.Namespace) -> int:
    """Show a job's status (queued, sending, retrying, delivered, failed or cancelled),
    with its attempts and last error."""
    status = client.status(args.id).as_dict()
    if args.json:
        print(json.dumps(status, ensure_ascii=False))
        return 0
    width = max(map(len, status))
    for name, value in status.items():
        print(f"{name:<{width}}  {_show(value)}")
    return 0


def _show(value: object) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, str | int) else json.dumps(value, ensure_ascii=False)


def _cancel(client: Client, args: argparse.Namespace) -> int:
    """Cancel a job that is not delivered yet (exit 1 if it was already final)."""
    info = client.cancel(args.id)
    if info.status is not JobStatus.CANCELLED:
        return _fail(info.status.value, f"job {args.id} was already {info.status.value}")
    print(f"cancelled {args.id}")
    return 0


def _jobs(client: Client, args: argparse.Namespace) -> int:
    """List jobs, newest change first, as a table (or JSON lines with --json)."""
    jobs = client.jobs(status=args.status, since=args.since, limit=args.limit)
    if args.json:
        for info in jobs:
            print(json.dumps(info.as_dict(), ensure_ascii=False))
        return 0
    columns = ("id", "channel", "status", "priority", "attempts", "updated_at", "last_error")
    _table(columns, [info.as_dict() for info in jobs])
    return 0


def _table(columns: tuple[str, ...], entries: list[dict[str, Any]]) -> None:
    rows = [[_show(entry.get(name)) for name in columns] for entry in entries]
    widths = [max([len(name), *(len(row[i]) for row in rows)]) for i, name in enumerate(columns)]
    for row in [list(columns), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def _retry(client: Client, args: argparse.Namespace) -> int:
    """Requeue a failed job by id, or every job failed since --since with --failed."""
    if (args.id is None) == (not args.failed) or args.failed != (args.since is not None):
        return _fail("invalid_request", "give a job id, or --failed --since 1h", status=2)
    ids = client.retry(args.id, since=args.since)
    for job_id in ids:
        print(job_id)
    print(f"requeued {len(ids)} job(s)", file=sys.stderr)
    return 0


def _purge(client: Client, args: argparse.Namespace) -> int:
    """Delete delivered, failed and cancelled jobs last changed longer ago than --older-than."""
    print(f"purged {client.purge(older_than=args.older_than)} job(s)")
    return 0


def _suppressions(client: Client, args: argparse.Namespace) -> int:
    """List the suppressed addresses (hard bounces and ``notifier suppress``), as a table
    (or JSON lines with --json)."""
    entries = [entry.as_dict() for entry in client.suppressions()]
    if args.json:
        for entry in entries:
            print(json.dumps(entry, ensure_ascii=False))
        return 0
    _table(("address", "created_at", "reason"), entries)
    return 0


def _suppress(client: Client, args: argparse.Namespace) -> int:
    """Stop sending email to an address; later jobs list it as refused."""
    client.suppress(args.address, args.reason)
    print(f"suppressed {args.address}")
    return 0


def _unsuppress(client: Client, args: argparse.Namespace) -> int:
    """Send email to a suppressed address again (exit 1 if it was not suppressed)."""
    if not client.unsuppress(args.address):
        return _fail("not_found", f"{args.address} was not suppressed")
    print(f"unsuppressed {args.address}")
    return 0


def _ping(client: Client, args: argparse.Namespace) -> int:
    """Check that the server answers and accepts the token."""
    client.ping()
    print("ok")
    return 0
