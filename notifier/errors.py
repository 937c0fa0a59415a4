"""Every error notifier raises, in two trees.

Protocol errors travel over the wire as ``{"ok": false, "error": {"code", "message"}}``;
the server raises them and the client turns each code back into its class::

    NotifierError                    .code, .message
     ├── InvalidJSON                 invalid_json
     ├── InvalidRequest              invalid_request (the message names the field)
     ├── UnknownOp                   unknown_op
     ├── UnknownChannel              unknown_channel
     ├── UnknownTemplate             unknown_template
     ├── TemplateError               template_error
     ├── Unauthorized                unauthorized
     ├── LineTooLong                 line_too_long
     ├── NotFound                    not_found
     ├── RateLimited                 rate_limited
     ├── Unavailable                 unavailable (shutting down, store unreachable)
     ├── InternalError               internal
     └── NotifierConnectionError     client side only: the server could not be reached

Delivery errors are raised by channels. The dispatcher asks one question of them,
"transient?", so each channel decides that once, where it translates its library's errors::

    DeliveryError                    .retry_after, .delivered, .providers, .failed
     ├── TransientDeliveryError      try again later (backoff, or the provider's Retry-After)
     │    ├── DeliveryTimeout        also a TimeoutError
     │    ├── DeliveryConnectionError  also a ConnectionError
     │    └── RecipientThrottled     .recipient: "too often" for this number; pace it
     └── PermanentDeliveryError      retrying cannot help: the job fails now
          ├── RecipientRejected      the recipient is wrong (bad number, blacklisted)
          ├── InvalidMessage         the content is wrong (refused words, too long)
          └── ProviderRejected       the provider refused *us* (credentials, balance):
                                     another provider may still deliver

A channel with several providers fails over on transient errors and ``ProviderRejected``,
never on a message-level refusal or on ``RecipientThrottled`` (another provider would
flood the same number).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import ClassVar


class ErrorCode(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_CHANNEL = "unknown_channel"
    UNKNOWN_TEMPLATE = "unknown_template"
    TEMPLATE_ERROR = "template_error"
    UNAUTHORIZED = "unauthorized"
    LINE_TOO_LONG = "line_too_long"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    CONNECTION = "connection"


class NotifierError(Exception):
    """An error answer of the protocol, or a client's failure to get one."""

    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class InvalidJSON(NotifierError):
    code = ErrorCode.INVALID_JSON


class InvalidRequest(NotifierError):
    code = ErrorCode.INVALID_REQUEST


class UnknownOp(NotifierError):
    code = ErrorCode.UNKNOWN_OP


class UnknownChannel(NotifierError):
    code = ErrorCode.UNKNOWN_CHANNEL


class UnknownTemplate(NotifierError):
    code = ErrorCode.UNKNOWN_TEMPLATE


class TemplateError(NotifierError):
    code = ErrorCode.TEMPLATE_ERROR


class Unauthorized(NotifierError):
    code = ErrorCode.UNAUTHORIZED


class LineTooLong(NotifierError):
    code = ErrorCode.LINE_TOO_LONG


class NotFound(NotifierError):
    code = ErrorCode.NOT_FOUND


class RateLimited(NotifierError):
    code = ErrorCode.RATE_LIMITED


class Unavailable(NotifierError):
    code = ErrorCode.UNAVAILABLE


class InternalError(NotifierError):
    code = ErrorCode.INTERNAL


class NotifierConnectionError(NotifierError, ConnectionError):
    """The client could not reach the server, or lost the connection before an answer."""

    code = ErrorCode.CONNECTION


ERRORS_BY_CODE: Mapping[str, type[NotifierError]] = {
    cls.code: cls
    for cls in (
        InvalidJSON,
        InvalidRequest,
        UnknownOp,
        UnknownChannel,
        UnknownTemplate,
        TemplateError,
        Unauthorized,
        LineTooLong,
        NotFound,
        RateLimited,
        Unavailable,
        InternalError,
        NotifierConnectionError,
    )
}


def error_for_code(code: str, message: str) -> NotifierError:
    """The exception for an error answer; an unknown code still gives a NotifierError."""
    cls = ERRORS_BY_CODE.get(code)
    return cls(message) if cls is not None else NotifierError(message, code=code)


class DeliveryError(Exception):
    """A channel could not deliver a message.

    ``delivered`` maps the recipients that did get the message to their provider ids, so
    a retry of a partly delivered job repeats only the others.
    """

    transient: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        delivered: Mapping[str, str | None] | None = None,
        providers: Mapping[str, str] | None = None,
        failed: Mapping[str, DeliveryError] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.delivered: dict[str, str | None] = dict(delivered or {})
        #: Which provider delivered each recipient of ``delivered``.
        self.providers: dict[str, str] = dict(providers or {})
        #: The error of each recipient when several failed (``throttled`` reads it).
        self.failed: dict[str, DeliveryError] = dict(failed or {})


class TransientDeliveryError(DeliveryError):
    """Worth another try later: timeouts, lost connections, busy or rate-limiting providers."""

    transient = True


class DeliveryTimeout(TransientDeliveryError, TimeoutError):
    pass


class DeliveryConnectionError(TransientDeliveryError, ConnectionError):
    pass


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help: rejected recipient, bad credentials, invalid message."""


class RecipientThrottled(TransientDeliveryError):
    """The provider says this number gets messages too often: every job to it should wait
    (``retry_after`` when the provider says how long), whichever provider would send it."""

    def __init__(self, message: str, *, recipient: str, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.recipient = recipient


class RecipientRejected(PermanentDeliveryError):
    """The recipient is wrong (bad or blacklisted number): no provider will do better."""


class InvalidMessage(PermanentDeliveryError):
    """The content is wrong (empty, too long, refused words): no provider will do better."""


class ProviderRejected(PermanentDeliveryError):
    """The provider refuses our account (credentials, balance, frozen): the message may be
    fine, so a channel with another provider fails over and stops using this one a while."""


def throttled(error: DeliveryError) -> dict[str, float | None]:
    """The recipients a failure says are sent to too often, with how long they should wait."""
    errors = error.failed.values() if error.failed else (error,)
    return {e.recipient: e.retry_after for e in errors if isinstance(e, RecipientThrottled)}
