"""notifier: durable email and SMS delivery over a JSON-lines TCP protocol.

This module is the public Python surface: the clients, their result types and the errors.
The service itself is run with ``notifier serve`` (see PROTOCOL.md).
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from notifier.client._async import AsyncClient
from notifier.client._core import JobInfo, SendResult
from notifier.client._sync import Client
from notifier.errors import (
    InternalError,
    InvalidJSON,
    InvalidRequest,
    LineTooLong,
    NotFound,
    NotifierConnectionError,
    NotifierError,
    RateLimited,
    TemplateError,
    Unauthorized,
    Unavailable,
    UnknownChannel,
    UnknownOp,
    UnknownTemplate,
)
from notifier.models import JobStatus

try:
    __version__ = _version("notifier")
except _PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AsyncClient",
    "Client",
    "InternalError",
    "InvalidJSON",
    "InvalidRequest",
    "JobInfo",
    "JobStatus",
    "LineTooLong",
    "NotFound",
    "NotifierConnectionError",
    "NotifierError",
    "RateLimited",
    "SendResult",
    "TemplateError",
    "Unauthorized",
    "Unavailable",
    "UnknownChannel",
    "UnknownOp",
    "UnknownTemplate",
    "__version__",
]
