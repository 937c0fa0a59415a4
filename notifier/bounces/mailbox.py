"""The bounce mailbox: its URL, and blocking POP3/IMAP sessions (stdlib) the reader runs in
a thread.

``NOTIFIER_BOUNCE_MAILBOX`` is ``pop3://``, ``pop3s://``, ``imap://`` or
``imaps://user:password@host[:port]`` (user and password percent-encoded where they hold
``@``, ``:`` or ``/``); IMAP reads the INBOX. The password lives in a ``SecretStr`` and no
error raised here carries it: library errors are translated in one place (``_translated``)
into ``MailboxError``, which names the mailbox without the password.

Deletion is two-step so that nothing is lost when a session breaks half-way: ``delete``
marks, ``commit`` makes the marks final (POP3: QUIT; IMAP: EXPUNGE). A session dropped
before ``commit`` deletes nothing on POP3; on IMAP the marked messages stay flagged
``\\Deleted``, are skipped by the next session (it lists only undeleted ones) and expunged by
its commit.
"""

from __future__ import annotations

import imaplib
import poplib
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

MailProtocol = Literal["pop3", "imap"]

_SCHEMES: dict[str, tuple[MailProtocol, bool, int]] = {
    "pop3": ("pop3", False, 110),
    "pop3s": ("pop3", True, 995),
    "imap": ("imap", False, 143),
    "imaps": ("imap", True, 993),
}


class MailboxError(ConnectionError):
    """The mailbox could not be reached, logged into or read; the next poll tries again."""


@dataclass(frozen=True)
class MailboxConfig:
    protocol: MailProtocol
    tls: bool
    host: str
    port: int
    username: str
    password: SecretStr = field(repr=False)
    ca_file: Path | None = None
    timeout: float = 30.0

    @property
    def display(self) -> str:
        """The URL without the password, for logs and errors."""
        scheme = self.protocol + ("s" if self.tls else "")
        return f"{scheme}://{self.username}@{self.host}:{self.port}"


def parse_mailbox_url(
    url: str, *, ca_file: Path | None = None, timeout: float = 30.0
) -> MailboxConfig:
    """The typed mailbox; ``ValueError`` names what is wrong, never quoting the password."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(
            "not a mailbox URL (pop3|pop3s|imap|imaps://user:password@host[:port])"
        ) from None
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"scheme must be pop3, pop3s, imap or imaps, not {parts.scheme or 'none'!r}"
        )
    protocol, tls, default_port = _SCHEMES[parts.scheme]
    if not parts.hostname:
        raise ValueError("the mailbox URL has no host")
    if not parts.username or parts.password is None:
        raise ValueError("the mailbox URL needs user:password@ before the host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("the mailbox URL takes no path, query or fragment (IMAP reads INBOX)")
    return MailboxConfig(
        protocol=protocol,
        tls=tls,
        host=parts.hostname,
        port=port or default_port,
        username=unquote(parts.username),
        password=SecretStr(unquote(parts.password)),
        ca_file=ca_file,
        timeout=timeout,
    )


class MailboxSession(Protocol):
    """One logged-in session; every method blocks, and raises only ``MailboxError``."""

    def keys(self) -> list[str]:
        """The messages present now (undeleted), oldest first."""

    def fetch(self, key: str) -> bytes:
        """The raw message, without marking it seen or read."""

    def delete(self, key: str) -> None:
        """Mark for deletion; final only at ``commit``."""

    def commit(self) -> None:
        """Make the deletions final and log out."""

    def close(self) -> None:
        """Drop the connection if still open, committing nothing; never raises."""


def open_session(config: MailboxConfig) -> MailboxSession:
    with _translated(config):
        if config.protocol == "pop3":
            return _POP3Session(config)
        return _IMAPSession(config)


@contextmanager
def _translated(config: MailboxConfig) -> Iterator[None]:
    try:
        yield
    except (OSError, EOFError, poplib.error_proto, imaplib.IMAP4.error) as exc:
        reason = str(exc) or type(exc).__name__
        secret = config.password.get_secret_value()
        if secret:
            reason = reason.replace(secret, "**********")
        raise MailboxError(f"{config.display}: {reason}") from None


def _tls_context(config: MailboxConfig) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=config.ca_file)


class _Session:
    """Connect and log in; a failed login closes the connection it opened."""

    def __init__(self, config: MailboxConfig) -> None:
        self._config = config
        self._connect(_tls_context(config) if config.tls else None)
        try:
            self._login()
        except BaseException:
            self.close()
            raise

    def _connect(self, tls: ssl.SSLContext | None) -> None:
        raise NotImplementedError

    def _login(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _POP3Session(_Session):
    _pop: poplib.POP3

    def _connect(self, tls: ssl.SSLContext | None) -> None:
        host, port, timeout = self._config.host, self._config.port, self._config.timeout
        if tls is None:
            self._pop = poplib.POP3(host, port, timeout=timeout)
        else:
            self._pop = poplib.POP3_SSL(host, port, timeout=timeout, context=tls)

    def _login(self) -> None:
        self._pop.user(self._config.username)
        self._pop.pass_(self._config.password.get_secret_value())

    def keys(self) -> list[str]:
        with _translated(self._config):
            _, listing, _ = self._pop.list()
        return [line.split()[0].decode("ascii") for line in listing]

    def fetch(self, key: str) -> bytes:
        with _translated(self._config):
            _, lines, _ = self._pop.retr(int(key))
        return b"\r\n".join(lines) + b"\r\n"

    def delete(self, key: str) -> None:
        with _translated(self._config):
            self._pop.dele(int(key))

    def commit(self) -> None:
        with _translated(self._config):
            self._pop.quit()

    def close(self) -> None:
        with suppress(OSError):
            self._pop.close()


class _IMAPSession(_Session):
    _imap: imaplib.IMAP4

    def _connect(self, tls: ssl.SSLContext | None) -> None:
        host, port, timeout = self._config.host, self._config.port, self._config.timeout
        if tls is None:
            self._imap = imaplib.IMAP4(host, port, timeout=timeout)
        else:
            self._imap = imaplib.IMAP4_SSL(host, port, ssl_context=tls, timeout=timeout)

    def _login(self) -> None:
        self._imap.login(self._config.username, self._config.password.get_secret_value())
        self._ok(self._imap.select("INBOX"))

    def _ok(self, answer: tuple[str, Sequence[object]]) -> Sequence[object]:
        status, data = answer
        if status != "OK":
            raise imaplib.IMAP4.error(f"{status} {data!r}")
        return data

    def keys(self) -> list[str]:
        with _translated(self._config):
            data = self._ok(self._imap.uid("SEARCH", "UNDELETED"))
        first = data[0] if data else b""
        return first.decode("ascii").split() if isinstance(first, bytes) else []

    def fetch(self, key: str) -> bytes:
        with _translated(self._config):
            data = self._ok(self._imap.uid("FETCH", key, "(BODY.PEEK[])"))
            for item in data:
                if isinstance(item, tuple) and isinstance(item[1], bytes):
                    return item[1]
            raise imaplib.IMAP4.error(f"message UID {key} is gone")

    def delete(self, key: str) -> None:
        with _translated(self._config):
            self._ok(self._imap.uid("STORE", key, "+FLAGS.SILENT", r"(\Deleted)"))

    def commit(self) -> None:
        with _translated(self._config):
            self._ok(self._imap.expunge())
            self._imap.logout()

    def close(self) -> None:
        with suppress(OSError):
            self._imap.shutdown()
