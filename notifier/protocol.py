"""The wire protocol (PROTOCOL.md): request models, field rules and answer encoding.

Parsing is strict and every refusal names the field, because the people reading these
errors are developers wiring up an app, often from another language.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from notifier.errors import InvalidJSON, InvalidRequest, NotifierError, UnknownOp
from notifier.models import JobStatus, Priority, bare_address, utcnow
from notifier.settings import HttpUrlText

#: A finite number only: ``1e400`` parses as infinity, which no JSON answer can echo.
Ref = StrictStr | StrictInt | Annotated[StrictFloat, Field(allow_inf_nan=False)]


def _recipient_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("must be a string or a list of strings")


Recipients = Annotated[list[str], BeforeValidator(_recipient_list)]

#: The common cases, checked without the email package's parser (tens of µs a mailbox, the
#: dearest part of an email send's intake): a bare address, and ``Name <address>`` with a
#: display name of plain words, which the parser reads as itself (tests/test_protocol.py).
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)*\Z")
_NAMED_ADDRESS = re.compile(
    r"[A-Za-z0-9]+( [A-Za-z0-9]+)* <[A-Za-z0-9_%+\-]+(\.[A-Za-z0-9_%+\-]+)*"
    r"@[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)*>\Z"
)
_PHONE = re.compile(r"^\+?[0-9]{5,15}$")
_PHONE_SEPARATORS = re.compile(r"[\s\-().]")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str
    ref: Ref | None = None
    token: StrictStr | None = None


class SendRequest(_Request):
    op: Literal["send"] = "send"
    channel: StrictStr
    to: Recipients
    subject: StrictStr | None = None
    text: StrictStr | None = None
    html: StrictStr | None = None
    template: StrictStr | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    cc: Recipients = Field(default_factory=list)
    bcc: Recipients = Field(default_factory=list)
    reply_to: Recipients = Field(default_factory=list)
    idempotency_key: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = None
    send_at: datetime | None = None
    priority: Priority = Priority.NORMAL
    collapse_key: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = None
    callback_url: HttpUrlText | None = None

    @field_validator("send_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must be an RFC 3339 timestamp with an offset, such as ...Z")
        return value if value is None else _in_utc_range(value)

    @field_validator("channel")
    @classmethod
    def _channel_name(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value


class JobRequest(_Request):
    op: Literal["status", "cancel"]
    id: StrictStr


class PingRequest(_Request):
    op: Literal["ping"]


class AuthRequest(_Request):
    op: Literal["auth"]
    token: StrictStr


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


def _in_utc_range(moment: datetime) -> datetime:
    """A moment the stores can keep and read back: ``9999-12-31T23:59:59-23:59`` parses but is
    year 10000 in UTC, and asyncpg stores the very first and last moments as -infinity and
    infinity, reading them back without a time zone."""
    try:
        in_range = _EARLIEST < moment.astimezone(UTC) < _LATEST
    except OverflowError:
        in_range = False
    if not in_range:
        raise ValueError("must fall within the years 1 to 9999 in UTC")
    return moment


def parse_duration(value: object) -> timedelta:
    """``90``, ``"90s"``, ``"15m"``, ``"1h"``, ``"30d"``, ``"2w"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        seconds: float = value
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if match is None:
            raise ValueError("must be a duration such as 90s, 15m, 1h or 30d")
        seconds = float(match[1]) * _UNITS[match[2]]
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError("must be a duration of at most 999999999 days") from None


def _since(value: object) -> datetime:
    """A duration back from now (``"1h"``) or an RFC 3339 timestamp."""
    if isinstance(value, str) and ("T" in value or "-" in value):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("must be a duration (1h) or an RFC 3339 timestamp") from None
        if moment.tzinfo is None:
            raise ValueError("timestamp needs an offset, such as ...Z")
        return _in_utc_range(moment)
    try:
        return utcnow() - parse_duration(value)
    except OverflowError:
        raise ValueError("must not reach back before the year 1") from None


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Since = Annotated[datetime, BeforeValidator(_since)]


class JobsRequest(_Request):
    """Admin: list jobs, newest change first."""

    op: Literal["jobs"]
    status: JobStatus | None = None
    since: Since | None = None
    limit: Annotated[int, Field(ge=1, le=10_000)] = 100


class RetryRequest(_Request):
    """Admin: requeue one failed job (``id``), or every job failed ``since``."""

    op: Literal["retry"]
    id: StrictStr | None = None
    since: Since | None = None


class PurgeRequest(_Request):
    """Admin: delete finished jobs last changed longer than ``older_than`` ago."""

    op: Literal["purge"]
    older_than: Duration


def _address(value: object) -> str:
    """An email address to suppress, as suppressions are kept: bare and lower case."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    address = bare_address(value)
    if "@" not in address:
        raise ValueError(f"{value!r} is not an email address")
    return address


Address = Annotated[str, BeforeValidator(_address)]


class SuppressionsRequest(_Request):
    """Admin: list the suppressed addresses."""

    op: Literal["suppressions"]


class SuppressRequest(_Request):
    """Admin: suppress an address (``reason`` says why), or lift it (``unsuppress``)."""

    op: Literal["suppress", "unsuppress"]
    address: Address
    reason: Annotated[StrictStr, Field(min_length=1, max_length=500)] = "suppressed by an operator"


Request = (
    SendRequest
    | JobRequest
    | PingRequest
    | AuthRequest
    | JobsRequest
    | RetryRequest
    | PurgeRequest
    | SuppressionsRequest
    | SuppressRequest
)

_MODELS: dict[str, type[_Request]] = {
    "send": SendRequest,
    "status": JobRequest,
    "cancel": JobRequest,
    "ping": PingRequest,
    "auth": AuthRequest,
    "jobs": JobsRequest,
    "retry": RetryRequest,
    "purge": PurgeRequest,
    "suppressions": SuppressionsRequest,
    "suppress": SuppressRequest,
    "unsuppress": SuppressRequest,
}
OPS = tuple(_MODELS)


#: What a JSON value that is not an object is called in JSON's own words.
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}


def decode_line(line: bytes) -> dict[str, Any]:
    """The JSON object of one request line (without its newline).

    pydantic-core's parser: several times faster than ``json`` on the intake's hot path.
    Valid JSON of another kind is a wrong request, not broken JSON (PROTOCOL.md); ``NaN``
    and ``Infinity`` are not JSON, whatever the parser would otherwise allow.
    """
    try:
        data = pydantic_core.from_json(line, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidJSON(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        kind = "null" if data is None else _JSON_KINDS.get(type(data), "a boolean")
        raise InvalidRequest(f"request: must be a JSON object, not {kind}")
    if b"\\u0000" in line and (field := _nul_in(data)) is not None:
        raise InvalidRequest(f"{field}: contains a NUL character (\\u0000), which is not stored")
    return data


def _nul_in(value: Any, path: str = "") -> str | None:
    """The first field holding a string with a NUL in it (PostgreSQL stores none)."""
    if isinstance(value, str):
        return path or "request" if "\x00" in value else None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            return path or "request"
        found = _nul_in(item, path or str(key))
        if found is not None:
            return found
    return None


def extract_ref(data: dict[str, Any]) -> Any:
    """The ``ref`` to echo, even when the rest of the request is refused."""
    ref = data.get("ref")
    if isinstance(ref, float) and not math.isfinite(ref):
        return None
    return ref if isinstance(ref, (str, int, float)) and not isinstance(ref, bool) else None


def parse_request(data: dict[str, Any]) -> Request:
    op = data.get("op", "send")
    if not isinstance(op, str):
        raise InvalidRequest("op: must be a string")
    model = _MODELS.get(op)
    if model is None:
        raise UnknownOp(f"unknown op {op!r}; known ops: {', '.join(OPS)}")
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else "request"
        if error["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown field")
        elif error["type"] == "missing":
            parts.append(f"{field}: required")
        else:
            parts.append(f"{field}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(dict.fromkeys(parts))


def check_header_value(value: str, field: str) -> str:
    """Refuse CR/LF (header injection) in anything that becomes a header."""
    if "\r" in value or "\n" in value:
        raise InvalidRequest(f"{field}: must not contain CR or LF")
    return value


def check_mailbox(value: str, field: str) -> str:
    """An RFC 5322 mailbox, ``addr@example.com`` or ``Name <addr@example.com>``."""
    if _PLAIN_ADDRESS.match(value) or _NAMED_ADDRESS.match(value):
        return value
    return parsed_mailbox(value, field)


def parsed_mailbox(value: str, field: str) -> str:
    """``check_mailbox`` by the email package's parser: any form RFC 5322 allows."""
    check_header_value(value, field)
    _, address = parseaddr(value)
    local, at, domain = address.rpartition("@")
    if not (at and local and domain) or " " in address:
        raise InvalidRequest(f"{field}: {value!r} is not an email address")
    return value.strip()


def check_phone(value: str, field: str) -> str:
    """E.164 (``+8613800138000``) or a national number; separators are dropped."""
    number = _PHONE_SEPARATORS.sub("", value)
    if not _PHONE.match(number):
        raise InvalidRequest(
            f"{field}: {value!r} is not a phone number (E.164 such as +14155550101)"
        )
    return number


def encode(answer: dict[str, Any]) -> bytes:
    """One answer line: compact UTF-8 JSON (non-ASCII text as itself, not escaped)."""
    return pydantic_core.to_json(answer) + b"\n"


def ok(ref: Any = None, **fields: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": True, **fields}
    if ref is not None:
        answer["ref"] = ref
    return answer


def error_answer(error: NotifierError, ref: Any = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": False, "error": {"code": error.code, "message": error.message}}
    if ref is not None:
        answer["ref"] = ref
    return answer
