"""The asyncio client: one stream connection (TLS optional), on which requests take turns."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

from tenacity import AsyncRetrying

from notifier.client._core import (
    DEFAULT_WINDOW,
    MAX_ANSWER_BYTES,
    Batch,
    ClientCore,
    EmailFields,
    JobFields,
    JobInfo,
    Poller,
    Progress,
    Recipients,
    SendResult,
    bad_answer,
    connection_lost,
    encode_request,
    job_id,
    keeps_connection,
    parse_answer,
)

T = TypeVar("T")


class _Connection:
    """A stream connection; every wait on it is bounded by ``timeout``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float | None,
        peer: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._peer = peer

    @classmethod
    async def open(
        cls, host: str, port: int, context: ssl.SSLContext | None, timeout: float | None, peer: str
    ) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=context, limit=MAX_ANSWER_BYTES
                )
        except OSError as exc:
            raise connection_lost(f"cannot connect to {peer}", exc) from exc
        return cls(reader, writer, timeout, peer)

    async def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            async with asyncio.timeout(self._timeout):
                await self._writer.drain()
        except OSError as exc:
            raise connection_lost(f"cannot write to {self._peer}", exc) from exc

    async def readline(self) -> bytes:
        try:
            async with asyncio.timeout(self._timeout):
                line = await self._reader.readline()
        except OSError as exc:
            raise connection_lost(f"no answer from {self._peer}", exc) from exc
        except ValueError:
            raise bad_answer(f"longer than {MAX_ANSWER_BYTES} bytes") from None
        if line.endswith(b"\n"):
            return line
        closed = ConnectionResetError("the server closed the connection")
        raise connection_lost(f"no answer from {self._peer}", closed)

    async def request(self, line: bytes) -> dict[str, Any]:
        await self.write(line)
        return parse_answer(await self.readline())

    def close(self) -> None:
        """Close at once, without waiting: safe in a task that is being cancelled."""
        self._writer.close()

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class AsyncClient(ClientCore[_Connection, asyncio.Lock]):
    """The asyncio twin of ``Client``, with the same arguments and methods, awaited.

    One client can be shared between tasks: their requests take turns on its connection.
    """

    def _new_lock(self) -> asyncio.Lock:
        return asyncio.Lock()

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection. The client cannot be used again (RuntimeError)."""
        async with self._lock:
            self._closed = True
            connection, self._conn = self._conn, None
            if connection is not None:
                await connection.aclose()

    async def send(self, channel: str, to: Recipients, **fields: Any) -> str:
        """See ``Client.send``."""
        line = self._send_line({"channel": channel, "to": to, **fields})
        return job_id(await self._request(line))

    async def send_email(self, to: Recipients, **fields: Unpack[EmailFields]) -> str:
        return await self.send("email", to, **fields)

    async def send_sms(self, to: Recipients, **fields: Unpack[JobFields]) -> str:
        return await self.send("sms", to, **fields)

    async def send_many(
        self, jobs: Iterable[Mapping[str, Any]], *, window: int = DEFAULT_WINDOW
    ) -> list[SendResult]:
        """See ``Client.send_many``."""
        batch = self._batch(jobs, window)
        if not batch.done:
            await self._call(lambda connection: self._run_batch(batch, connection), batch.progress)
        return batch.results()

    async def status(self, job_id: str) -> JobInfo:
        """See ``Client.status``."""
        return JobInfo.from_answer(await self._request(self._job_line("status", job_id)))

    async def cancel(self, job_id: str) -> JobInfo:
        """See ``Client.cancel``."""
        return JobInfo.from_answer(await self._request(self._job_line("cancel", job_id)))

    async def jobs(
        self, *, status: str | None = None, since: str | datetime | None = None, limit: int = 100
    ) -> list[JobInfo]:
        """See ``Client.jobs``."""
        answer = await self._request(
            self._admin_line("jobs", status=status, since=since, limit=limit)
        )
        return [JobInfo.from_answer(job) for job in answer["jobs"]]

    async def retry(
        self, job_id: str | None = None, *, since: str | datetime | None = None
    ) -> list[str]:
        """See ``Client.retry``."""
        answer = await self._request(self._admin_line("retry", id=job_id, since=since))
        return list(answer["ids"])

    async def purge(self, *, older_than: str | float) -> int:
        """See ``Client.purge``."""
        return int(
            (await self._request(self._admin_line("purge", older_than=older_than)))["purged"]
        )

    async def ping(self) -> None:
        """See ``Client.ping``."""
        await self._request(encode_request({"op": "ping"}))

    async def wait(self, job_id: str, *, timeout: float = 60.0, interval: float = 1.0) -> JobInfo:
        """See ``Client.wait``."""
        poller = Poller(timeout, interval)
        while True:
            info = await self.status(job_id)
            if info.final:
                return info
            await asyncio.sleep(poller.next_delay(info))

    async def _request(self, line: bytes) -> dict[str, Any]:
        return await self._call(lambda connection: connection.request(line))

    @staticmethod
    async def _run_batch(batch: Batch, connection: _Connection) -> None:
        batch.rewind()
        while not batch.done:
            if chunk := batch.to_write():
                await connection.write(chunk)
            batch.on_answer(await connection.readline())

    async def _call(
        self, exchange: Callable[[_Connection], Awaitable[T]], progress: Progress | None = None
    ) -> T:
        async with self._lock:
            self._check_open()
            result: T = await AsyncRetrying(**self._retry_options(progress))(
                self._attempt, exchange
            )
            return result

    async def _attempt(self, exchange: Callable[[_Connection], Awaitable[T]]) -> T:
        connection = self._conn or await self._connect()
        try:
            return await exchange(connection)
        except BaseException as exc:
            if not keeps_connection(exc):
                self._drop()
            raise

    async def _connect(self) -> _Connection:
        connection = await _Connection.open(
            self.host, self.port, self._ssl_context, self.timeout, self._peer
        )
        auth = self._auth_line()
        try:
            if auth is not None:
                await connection.request(auth)
        except BaseException:
            connection.close()
            raise
        self._conn = connection
        return connection

    def _drop(self) -> None:
        connection, self._conn = self._conn, None
        if connection is not None:
            connection.close()
