"""``notifier`` exports exactly its public surface (httpx's test of the same name)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

import notifier
from notifier.errors import ERRORS_BY_CODE

PUBLIC = {
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
}


def test_all_names_exactly_the_public_surface() -> None:
    assert sorted(notifier.__all__) == sorted(PUBLIC)
    assert len(notifier.__all__) == len(set(notifier.__all__))


def test_every_public_attribute_is_in_all() -> None:
    """Nothing leaks: the only other public attributes are the package's own modules."""
    public = {
        name
        for name in dir(notifier)
        if not name.startswith("_") and not isinstance(getattr(notifier, name), ModuleType)
    }
    assert public == PUBLIC - {"__version__"}


def test_every_error_class_is_exported() -> None:
    exported = {getattr(notifier, name) for name in notifier.__all__}
    assert set(ERRORS_BY_CODE.values()) <= exported


def test_version() -> None:
    try:
        expected = version("notifier")
    except PackageNotFoundError:  # a source tree that was never installed
        expected = "0+unknown"
    assert notifier.__version__ == expected
