"""notifier: durable email and SMS delivery over a JSON-lines TCP protocol.

This module is the public Python surface: the clients, their result types and the errors,
and what a third-party channel needs (``Channel``, ``Message``, ``Receipt`` and the delivery
errors; docs/channels.md). The service itself is run with ``notifier serve``; its wire
protocol is docs/protocol.md.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from notifier.channels import Channel
from notifier.client._async import AsyncClient
from notifier.client._core import JobInfo, SendResult, Suppression
from notifier.client._sync import Client
from notifier.errors import (
    DeliveryConnectionError,
    DeliveryError,
    DeliveryTimeout,
    InternalError,
    InvalidJSON,
    InvalidMessage,
    InvalidRequest,
    LineTooLong,
    NotFound,
    NotifierConnectionError,
    NotifierError,
    PermanentDeliveryError,
    ProviderRejected,
    RateLimited,
    RecipientRejected,
    RecipientThrottled,
    TemplateError,
    TransientDeliveryError,
    Unauthorized,
    Unavailable,
    UnknownChannel,
    UnknownOp,
    UnknownTemplate,
)
from notifier.models import JobStatus, Message, Receipt

try:
    __version__ = _version("notifier")
except _PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AsyncClient",
    "Channel",
    "Client",
    "DeliveryConnectionError",
    "DeliveryError",
    "DeliveryTimeout",
    "InternalError",
    "InvalidJSON",
    "InvalidMessage",
    "InvalidRequest",
    "JobInfo",
    "JobStatus",
    "LineTooLong",
    "Message",
    "NotFound",
    "NotifierConnectionError",
    "NotifierError",
    "PermanentDeliveryError",
    "ProviderRejected",
    "RateLimited",
    "Receipt",
    "RecipientRejected",
    "RecipientThrottled",
    "SendResult",
    "Suppression",
    "TemplateError",
    "TransientDeliveryError",
    "Unauthorized",
    "Unavailable",
    "UnknownChannel",
    "UnknownOp",
    "UnknownTemplate",
    "__version__",
]
