"""The protocol side of the client, shared by ``Client`` and ``AsyncClient``: no I/O here.

Every request this client sends can be sent again without harm: a ``send`` always carries an
idempotency key (a uuid4 unless the caller gave one), ``status``, ``cancel``, ``ping``
and ``auth`` change nothing when repeated, and ``suppress``/``unsuppress`` end in the same
state (only what they answer can differ, as their docstrings say). So when a connection
drops or the server restarts, the client reconnects with backoff and sends again whatever
was not answered, and a job is still stored, and delivered, once.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, TypedDict, TypeVar

from pydantic import ValidationError
from tenacity import RetryCallState, retry_if_exception, wait_exponential, wait_random

from notifier.errors import (
    InvalidRequest,
    NotifierConnectionError,
    NotifierError,
    Unavailable,
    error_for_code,
)
from notifier.models import JobStatus, isoformat
from notifier.protocol import SendRequest, describe_validation_error

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7725
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRY_TIMEOUT = 10.0
#: Requests of ``send_many`` in flight at most: below the server's default
#: ``NOTIFIER_MAX_PIPELINE`` (1000), so it never stops reading while this client writes.
DEFAULT_WINDOW = 500
MAX_ANSWER_BYTES = 16 * 1024 * 1024

#: One address or number, or several.
Recipients = str | Sequence[str]
_RECIPIENT_FIELDS = ("to", "cc", "bcc", "reply_to")
#: Send fields of protocol 1.1 that the client passes through for the server to check, unless
#: the protocol model it checks jobs with knows them.
_PASSED_THROUGH = ("priority", "collapse_key", "callback_url")


class JobFields(TypedDict, total=False):
    """The optional fields every job may carry (an SMS job has no others)."""

    text: str
    template: str
    data: Mapping[str, Any]
    send_at: datetime | str
    idempotency_key: str
    ref: str | int
    priority: Literal["high", "normal", "low"]
    collapse_key: str
    callback_url: str


class EmailFields(JobFields, total=False):
    """The optional fields of an email job."""

    subject: str
    html: str
    cc: Recipients
    bcc: Recipients
    reply_to: Recipients


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job's state, as ``status()`` answers it. ``extra`` keeps the fields the server
    added beyond these (``run_at``, per-recipient ``results``, ...)."""

    id: str
    channel: str
    status: JobStatus
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def final(self) -> bool:
        """Delivered, failed or cancelled: the status will not change any more."""
        return self.status.final

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> JobInfo:
        known = {"ok", "ref", "id", "channel", "status", "attempts", "last_error"}
        known |= {"created_at", "updated_at"}
        try:
            last_error = answer.get("last_error")
            return cls(
                id=str(answer["id"]),
                channel=str(answer["channel"]),
                status=JobStatus(answer["status"]),
                attempts=int(answer["attempts"]),
                last_error=None if last_error is None else str(last_error),
                created_at=datetime.fromisoformat(answer["created_at"]),
                updated_at=datetime.fromisoformat(answer["updated_at"]),
                extra={k: v for k, v in answer.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise bad_answer(f"status answer without a valid {exc}") from exc

    def as_dict(self) -> dict[str, Any]:
        """The status as JSON-ready data, in the protocol's own shape."""
        return {
            "id": self.id,
            "channel": self.channel,
            "status": self.status.value,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
            **self.extra,
        }


_SUPPRESSION_FIELDS = ("address", "reason", "created_at")


@dataclass(frozen=True, slots=True)
class Suppression:
    """An address that email jobs no longer send to, as ``suppressions()`` lists it."""

    address: str
    reason: str | None
    created_at: datetime
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def from_answer(cls, entry: Mapping[str, Any]) -> Suppression:
        try:
            reason = entry.get("reason")
            return cls(
                address=str(entry["address"]),
                reason=None if reason is None else str(reason),
                created_at=datetime.fromisoformat(entry["created_at"]),
                extra={k: v for k, v in entry.items() if k not in _SUPPRESSION_FIELDS},
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise bad_answer(f"suppression without a valid {exc}") from exc

    def as_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready data, in the protocol's own shape."""
        return {
            "address": self.address,
            "reason": self.reason,
            "created_at": isoformat(self.created_at),
            **self.extra,
        }


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of one job of ``send_many``: its id, or the error that refused it.

    ``duplicate`` means the server already held a job with this idempotency key: one you
    sent before, or this very job when a dropped connection made the client send it again.
    """

    id: str | None
    duplicate: bool = False
    error: NotifierError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def connection_lost(doing: str, cause: OSError) -> NotifierConnectionError:
    """The error for a request that got no answer; ``cause`` decides whether to retry."""
    error = NotifierConnectionError(f"{doing}: {cause or type(cause).__name__}")
    error.__cause__ = cause
    return error


def bad_answer(what: str) -> NotifierConnectionError:
    """The server sent something that is not an answer: the connection is out of step."""
    return NotifierConnectionError(f"the server's answer is not a notifier answer: {what}")


def worth_retrying(exc: BaseException) -> bool:
    """Whether a new connection may succeed where this one failed.

    Lost connections and timeouts may; so may ``unavailable``, the answer of a server that
    is shutting down. A certificate that does not verify will not, nor will any other answer.
    """
    if isinstance(exc, Unavailable):
        return True
    cause = exc.__cause__
    return (
        isinstance(exc, NotifierConnectionError)
        and isinstance(cause, OSError)
        and not isinstance(cause, ssl.SSLCertVerificationError)
    )


def keeps_connection(exc: BaseException) -> bool:
    """Whether the connection is still in step after ``exc``: only after a whole error answer.

    After anything else (a lost connection, a timeout, a cancelled task mid-request) an answer
    may still be on its way, and would be taken for the next request's.
    """
    return isinstance(exc, NotifierError) and not isinstance(
        exc, NotifierConnectionError | Unavailable
    )


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_request(request: Mapping[str, Any]) -> bytes:
    """One request line. JSON escapes every newline, so a line it stays."""
    try:
        text = json.dumps(request, ensure_ascii=False, separators=(",", ":"), default=_json_default)
        return text.encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"request: cannot be written as JSON: {exc}") from None


def parse_answer(line: bytes) -> dict[str, Any]:
    """The answer of a good request; an error answer raises its ``NotifierError`` subclass."""
    try:
        answer = json.loads(line)
    except ValueError:
        raise bad_answer(repr(line[:200])) from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise bad_answer(repr(line[:200]))
    if answer["ok"]:
        return answer
    error = answer.get("error")
    if not isinstance(error, dict):
        raise bad_answer(repr(line[:200]))
    raise error_for_code(str(error.get("code")), str(error.get("message", "")))


def job_id(answer: Mapping[str, Any]) -> str:
    value = answer.get("id")
    if not isinstance(value, str):
        raise bad_answer("a send answer without an id")
    return value


def suppressions(answer: Mapping[str, Any]) -> list[Suppression]:
    entries = answer.get("suppressions")
    if not isinstance(entries, list):
        raise bad_answer("a suppressions answer without a list of suppressions")
    return [Suppression.from_answer(entry) for entry in entries]


def removed(answer: Mapping[str, Any]) -> bool:
    value = answer.get("removed")
    if not isinstance(value, bool):
        raise bad_answer("an unsuppress answer without removed: true or false")
    return value


class Progress:
    """The retry budget: give up once nothing was answered for ``timeout`` seconds.

    A single request has that long to get through; a long ``send_many`` gets it afresh after
    every answer, so it survives several restarts while a dead server still fails it in time.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.mark()

    def mark(self) -> None:
        self._last = time.monotonic()

    def stalled(self, state: RetryCallState) -> bool:
        return time.monotonic() - self._last >= self.timeout


class Batch:
    """The pipelining state of ``send_many``, driven by the I/O loop of either client.

    Up to ``window`` requests are in flight; more are written once half of them are answered,
    so every write carries many lines while neither side's buffers can fill up. After a lost
    connection, ``rewind`` puts the unanswered requests back in front: they are sent again on
    the next connection, with the same idempotency keys.
    """

    def __init__(self, lines: Sequence[bytes | NotifierError], window: int, progress: Progress):
        if window < 1:
            raise ValueError("window: must be at least 1")
        self.progress = progress
        self._window = window
        self._lines = lines
        self._results: list[SendResult | None] = [
            SendResult(None, error=line) if isinstance(line, NotifierError) else None
            for line in lines
        ]
        self._pending = deque(i for i, line in enumerate(lines) if isinstance(line, bytes))
        self._in_flight: deque[int] = deque()

    @property
    def done(self) -> bool:
        return not self._pending and not self._in_flight

    def rewind(self) -> None:
        self._pending.extendleft(reversed(self._in_flight))
        self._in_flight.clear()

    def to_write(self) -> bytes:
        """The lines to write now; none while more than half the window is unanswered."""
        if len(self._in_flight) > self._window // 2:
            return b""
        chunk = []
        while self._pending and len(self._in_flight) < self._window:
            index = self._pending.popleft()
            self._in_flight.append(index)
            line = self._lines[index]
            assert isinstance(line, bytes)
            chunk.append(line)
        return b"".join(chunk)

    def on_answer(self, line: bytes) -> None:
        """Record the answer to the oldest request in flight.

        An error answer is that job's result; ``unavailable`` and a garbled answer are raised
        instead, leaving the job in flight, to be sent again on a new connection.
        """
        try:
            answer = parse_answer(line)
        except (NotifierConnectionError, Unavailable):
            raise
        except NotifierError as exc:
            result = SendResult(None, error=exc)
        else:
            result = SendResult(job_id(answer), duplicate=answer.get("duplicate") is True)
        self._results[self._in_flight.popleft()] = result
        self.progress.mark()

    def results(self) -> list[SendResult]:
        assert self.done, "the batch is not finished"
        return [result for result in self._results if result is not None]


class Poller:
    """The pauses of ``wait()``: short at first, growing to ``interval``, ending at the deadline."""

    def __init__(self, timeout: float, interval: float) -> None:
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._interval = interval
        self._delay = min(0.02, interval)

    def next_delay(self, info: JobInfo) -> float:
        """How long to pause after this check of ``info``; TimeoutError if it was the last."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"job {info.id} is still {info.status.value} after {self._timeout:g}s"
            )
        delay = min(self._delay, remaining)
        self._delay = min(self._delay * 2, self._interval)
        return delay


def _env_port() -> int:
    value = os.environ.get("NOTIFIER_PORT")
    if not value:
        return DEFAULT_PORT
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"NOTIFIER_PORT: {value!r} is not a port number") from None


def _ssl_context(
    tls: ssl.SSLContext | bool | None, ca_file: str | os.PathLike[str] | None
) -> ssl.SSLContext | None:
    if isinstance(tls, ssl.SSLContext):
        if ca_file is not None:
            raise ValueError("give ca_file or an SSLContext as tls, not both")
        return tls
    if tls is False or (tls is None and ca_file is None):
        return None
    return ssl.create_default_context(cafile=ca_file)


ConnT = TypeVar("ConnT")
LockT = TypeVar("LockT")


class ClientCore(Generic[ConnT, LockT]):
    """Configuration, request lines and lifecycle, shared by both clients; the subclasses
    bring the connection type, the lock type and the I/O."""

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        tls: ssl.SSLContext | bool | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    ) -> None:
        self.host = host or os.environ.get("NOTIFIER_HOST") or DEFAULT_HOST
        self.port = port if port is not None else _env_port()
        self._token = token if token is not None else os.environ.get("NOTIFIER_TOKEN") or None
        if ca_file is None and tls is None:
            ca_file = os.environ.get("NOTIFIER_CA_FILE") or None
        self._ssl_context = _ssl_context(tls, ca_file)
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self._closed = False
        self._conn: ConnT | None = None
        self._lock: LockT = self._new_lock()

    def _new_lock(self) -> LockT:
        """The lock that makes requests take turns on the one connection."""
        raise NotImplementedError

    def __repr__(self) -> str:
        tls = self._ssl_context is not None
        return f"{type(self).__name__}(host={self.host!r}, port={self.port}, tls={tls})"

    @property
    def _peer(self) -> str:
        return f"notifier at {self.host}:{self.port}"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed; create a new one")

    def _auth_line(self) -> bytes | None:
        return None if self._token is None else encode_request({"op": "auth", "token": self._token})

    @staticmethod
    def _send_line(job: Mapping[str, Any]) -> bytes:
        """Check a job as the server will, and add an idempotency key unless it has one.

        Fields given as None are left out, so that optional arguments can be passed through.
        """
        request: dict[str, Any] = {k: v for k, v in job.items() if v is not None}
        for name in _RECIPIENT_FIELDS:
            value = request.get(name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                request[name] = list(value)
        request.setdefault("idempotency_key", str(uuid.uuid4()))
        known = SendRequest.model_fields
        checked = {k: v for k, v in request.items() if k in known or k not in _PASSED_THROUGH}
        try:
            SendRequest.model_validate(checked)
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_error(exc)) from None
        return encode_request(request)

    @staticmethod
    def _job_line(op: str, job_id: str) -> bytes:
        if not isinstance(job_id, str) or not job_id:
            raise InvalidRequest("id: must be a non-empty string")
        return encode_request({"op": op, "id": job_id})

    @staticmethod
    def _admin_line(op: str, **fields: Any) -> bytes:
        """``jobs``, ``retry``, ``purge``, ``suppressions``: the operations behind the admin
        commands."""
        return encode_request({"op": op, **{k: v for k, v in fields.items() if v is not None}})

    @classmethod
    def _address_line(cls, op: str, address: str, reason: str | None = None) -> bytes:
        """``suppress`` and ``unsuppress``: refused before sending unless the address is one."""
        if not isinstance(address, str) or not address.strip():
            raise InvalidRequest("address: must be a non-empty string")
        if reason is not None and not isinstance(reason, str):
            raise InvalidRequest("reason: must be a string")
        return cls._admin_line(op, address=address, reason=reason)

    def _batch(self, jobs: Iterable[Mapping[str, Any]], window: int) -> Batch:
        lines: list[bytes | NotifierError] = []
        for job in jobs:
            try:
                lines.append(self._send_line(job))
            except InvalidRequest as exc:
                lines.append(exc)
        return Batch(lines, window, Progress(self.retry_timeout))

    def _retry_options(self, progress: Progress | None = None) -> dict[str, Any]:
        """How tenacity retries a request (or a batch): backoff with jitter, within a budget
        that starts now."""
        progress = progress or Progress(self.retry_timeout)
        progress.mark()
        return {
            "retry": retry_if_exception(worth_retrying),
            "stop": progress.stalled,
            "wait": wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.1),
            "reraise": True,
        }
