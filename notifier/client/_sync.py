# Generated from notifier/client/_async.py by scripts/unasync.py: do not edit.
# Edit notifier/client/_async.py, then run `python scripts/unasync.py`.
"""The blocking client: one socket (TLS optional), on which requests take turns.

It runs no event loop of its own, so it works anywhere, a running loop's executor threads
included (``await loop.run_in_executor(None, client.send, ...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

from tenacity import Retrying

from notifier.client._core import (
    DEFAULT_WINDOW,
    Batch,
    ClientCore,
    EmailFields,
    JobFields,
    JobInfo,
    Poller,
    Progress,
    Recipients,
    SendResult,
    Suppression,
    encode_request,
    job_id,
    keeps_connection,
    removed,
    suppressions,
)
from notifier.client._transports import SyncConnection, SyncLock, sync_sleep

T = TypeVar("T")


class Client(ClientCore[SyncConnection, SyncLock]):
    """A blocking notifier client. It connects on first use and reconnects by itself; one
    client can be shared between threads, whose requests take turns on its connection.

    ``host``, ``port`` and ``token`` default to ``NOTIFIER_HOST``, ``NOTIFIER_PORT`` and
    ``NOTIFIER_TOKEN`` (then ``127.0.0.1:7725``, no token). The token is sent once per
    connection, as ``{"op": "auth"}``, right after connecting.

    TLS is on with ``ca_file`` (a CA bundle to trust, default ``NOTIFIER_CA_FILE``), with
    ``tls=True`` (the system's CAs) or with your own ``ssl.SSLContext`` as ``tls``.

    ``timeout`` bounds each connect, write and wait for an answer (None: no bound).
    ``retry_timeout`` is how long to keep reconnecting and sending again after a lost
    connection or an ``unavailable`` answer before raising (0: never retry).
    """

    def _new_lock(self) -> SyncLock:
        return SyncLock()

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection. The client cannot be used again (RuntimeError)."""
        with self._lock:
            self._closed = True
            connection, self._conn = self._conn, None
            if connection is not None:
                connection.close()

    def send(self, channel: str, to: Recipients, **fields: Any) -> str:
        """Store a job and return its id once the server has stored it durably.

        ``fields`` are the protocol's (``subject``, ``text``, ``template``, ``data``,
        ``priority``, ``collapse_key``, ``callback_url``, ...). Raises the ``NotifierError``
        of the server's answer, or ``InvalidRequest`` before sending anything if the job
        cannot be valid.
        """
        line = self._send_line({"channel": channel, "to": to, **fields})
        return job_id(self._request(line))

    def send_email(self, to: Recipients, **fields: Unpack[EmailFields]) -> str:
        """``send`` on the email channel, with typed keyword arguments."""
        return self.send("email", to, **fields)

    def send_sms(self, to: Recipients, **fields: Unpack[JobFields]) -> str:
        """``send`` on the SMS channel, with typed keyword arguments."""
        return self.send("sms", to, **fields)

    def send_many(
        self, jobs: Iterable[Mapping[str, Any]], *, window: int = DEFAULT_WINDOW
    ) -> list[SendResult]:
        """Send many jobs on one connection, pipelined, and return their results in order.

        Each job is a mapping of the fields of ``send`` (``channel``, ``to``, ...). A refused
        job gets its error in its result; the others are stored all the same.
        """
        batch = self._batch(jobs, window)
        if not batch.done:
            self._call(lambda connection: self._run_batch(batch, connection), batch.progress)
        return batch.results()

    def status(self, job_id: str) -> JobInfo:
        """The job's state; ``NotFound`` for an unknown id."""
        return JobInfo.from_answer(self._request(self._job_line("status", job_id)))

    def cancel(self, job_id: str) -> JobInfo:
        """Cancel a job not delivered yet; ``NotFound`` for an unknown id. The answer says
        ``cancelled``, or ``delivered``/``failed`` when it was already too late."""
        return JobInfo.from_answer(self._request(self._job_line("cancel", job_id)))

    def jobs(
        self, *, status: str | None = None, since: str | datetime | None = None, limit: int = 100
    ) -> list[JobInfo]:
        """Jobs changed since ``since`` (a duration such as ``"1h"``, or a time), newest first."""
        line = self._admin_line("jobs", status=status, since=since, limit=limit)
        answer = self._request(line)
        return [JobInfo.from_answer(job) for job in answer["jobs"]]

    def retry(self, job_id: str | None = None, *, since: str | datetime | None = None) -> list[str]:
        """Requeue a failed job, or every job failed since ``since``; returns the ids requeued.

        Re-sent after a lost connection like every request: retrying one id that the first try
        already requeued answers ``InvalidRequest`` (it is no longer failed).
        """
        answer = self._request(self._admin_line("retry", id=job_id, since=since))
        return list(answer["ids"])

    def purge(self, *, older_than: str | float) -> int:
        """Delete finished jobs older than ``older_than`` (``"30d"``, or seconds)."""
        answer = self._request(self._admin_line("purge", older_than=older_than))
        return int(answer["purged"])

    def suppressions(self) -> list[Suppression]:
        """The addresses email jobs no longer send to (hard bounces, or ``suppress``)."""
        return suppressions(self._request(self._admin_line("suppressions")))

    def suppress(self, address: str, reason: str | None = None) -> None:
        """Stop sending email to ``address``: later jobs list it in ``results.refused``."""
        self._request(self._address_line("suppress", address, reason))

    def unsuppress(self, address: str) -> bool:
        """Send to ``address`` again; False if it was not suppressed.

        Re-sent after a lost connection like every request: when the first try removed the
        address, the answer to the second is False.
        """
        return removed(self._request(self._address_line("unsuppress", address)))

    def ping(self) -> None:
        """Check that the server answers (and accepts the token, if there is one)."""
        self._request(encode_request({"op": "ping"}))

    def wait(self, job_id: str, *, timeout: float = 60.0, interval: float = 1.0) -> JobInfo:
        """Poll the job until it is delivered, failed or cancelled; TimeoutError after
        ``timeout`` seconds. Polls often at first, then every ``interval`` seconds."""
        poller = Poller(timeout, interval)
        while True:
            info = self.status(job_id)
            if info.final:
                return info
            sync_sleep(poller.next_delay(info))

    def _request(self, line: bytes) -> dict[str, Any]:
        return self._call(lambda connection: connection.request(line))

    @staticmethod
    def _run_batch(batch: Batch, connection: SyncConnection) -> None:
        batch.rewind()
        while not batch.done:
            if chunk := batch.to_write():
                connection.write(chunk)
            batch.on_answer(connection.readline())

    def _call(self, exchange: Callable[[SyncConnection], T], progress: Progress | None = None) -> T:
        with self._lock:
            self._check_open()
            retrying = Retrying(**self._retry_options(progress))
            result: T = retrying(self._attempt, exchange)
            return result

    def _attempt(self, exchange: Callable[[SyncConnection], T]) -> T:
        connection = self._conn or self._connect()
        try:
            return exchange(connection)
        except BaseException as exc:
            if not keeps_connection(exc):
                self._drop()
            raise

    def _connect(self) -> SyncConnection:
        connection = SyncConnection.open(
            self.host, self.port, self._ssl_context, self.timeout, self._peer
        )
        auth = self._auth_line()
        try:
            if auth is not None:
                connection.request(auth)
        except BaseException:
            connection.close()
            raise
        self._conn = connection
        return connection

    def _drop(self) -> None:
        """Close at once, without waiting: an answer may still be on its way, and must not be
        taken for the next request's."""
        connection, self._conn = self._conn, None
        if connection is not None:
            connection.close()
