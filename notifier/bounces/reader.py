"""The bounce reader: every interval, read the mailbox, hand the bounces to the store, delete
what was handled.

What happens to each message:

- a DSN (matched to a job or not, that is the sink's business): its failed recipients go to
  ``record``; once that returns, the message is deleted; a DSN with no failed recipient
  (``delayed``, ``delivered``, ``relayed``) is deleted without a call;
- not a DSN at all (an auto-reply, spam): logged and deleted;
- a DSN that cannot be parsed: logged and left in the mailbox for a human;
- ``record`` raised ("cannot record now", the store is down): the message is kept and the
  poll ends there; the next poll reads it again. Deletions made so far are committed.

Mailbox errors are logged and the next poll tries again; nothing stops the loop but ``stop``.
Recording is at least once: a report recorded but not deleted (the connection broke in
between) is recorded again at the next poll, so the sink must take duplicates calmly.
Each poll runs under ``exclusive()`` (the integrator passes a PostgreSQL advisory lock, so
only one instance reads a shared mailbox); when that yields ``False`` the poll is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from email.message import Message

from notifier.bounces.dsn import Bounce, header_value, is_dsn, parse_dsn, parse_message
from notifier.bounces.mailbox import MailboxConfig, MailboxError, MailboxSession, open_session

log = logging.getLogger("notifier.bounces")

Sink = Callable[[list[Bounce]], Awaitable[None]]
Exclusive = Callable[[], AbstractAsyncContextManager[bool]]


@asynccontextmanager
async def always_acquired() -> AsyncIterator[bool]:
    """The default lock: one instance, nothing to share."""
    yield True


@dataclass
class PollResult:
    """What one poll did, for the log line and for tests."""

    deleted: int = 0
    kept: int = 0
    bounces: int = 0


class _Deferred(Exception):
    """The sink could not record; keep the message and end the poll."""


class BounceReader:
    def __init__(
        self,
        mailbox: MailboxConfig,
        record: Sink,
        *,
        interval: float = 60.0,
        exclusive: Exclusive = always_acquired,
    ) -> None:
        self.mailbox = mailbox
        self.interval = interval
        self._record = record
        self._exclusive = exclusive
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the bounce reader is already started")
        log.info("reading bounces from %s every %gs", self.mailbox.display, self.interval)
        self._task = asyncio.create_task(self._run(), name="bounces")

    async def stop(self) -> None:
        """Cancel the loop; a poll cut off deletes nothing it had not committed."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @asynccontextmanager
    async def running(self) -> AsyncIterator[BounceReader]:
        """Started for the block, stopped after it."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except MailboxError as exc:
                log.warning("bounce mailbox unavailable, retrying in %gs: %s", self.interval, exc)
            except Exception:
                log.exception("bounce poll failed, retrying in %gs", self.interval)
            await asyncio.sleep(self.interval)

    async def poll(self) -> PollResult | None:
        """One pass over the mailbox; ``None`` when another instance holds the lock.

        Raises ``MailboxError`` when the mailbox cannot be read.
        """
        async with self._exclusive() as acquired:
            if not acquired:
                return None
            session = await asyncio.to_thread(open_session, self.mailbox)
            try:
                result = await self._read(session)
                await asyncio.to_thread(session.commit)
            finally:
                await asyncio.to_thread(session.close)
        if result.deleted or result.kept:
            log.info(
                "bounce mailbox: %d bounces recorded, %d messages deleted, %d kept",
                result.bounces,
                result.deleted,
                result.kept,
            )
        return result

    async def _read(self, session: MailboxSession) -> PollResult:
        result = PollResult()
        for key in await asyncio.to_thread(session.keys):
            raw = await asyncio.to_thread(session.fetch, key)
            try:
                recorded = await self._handle(parse_message(raw))
            except _Deferred:
                result.kept += 1
                break
            if recorded is None:
                result.kept += 1
                continue
            await asyncio.to_thread(session.delete, key)
            result.deleted += 1
            result.bounces += recorded
        return result

    async def _handle(self, message: Message) -> int | None:
        """How many bounces were recorded, or ``None`` to keep the message."""
        about = _describe(message)
        if not is_dsn(message):
            log.info("bounce mailbox: deleting %s: not a delivery status notification", about)
            return 0
        try:
            bounces = parse_dsn(message)
        except Exception as exc:
            log.warning(
                "bounce mailbox: leaving %s in the mailbox, cannot parse it: %s", about, exc
            )
            return None
        if bounces:
            try:
                await self._record(bounces)
            except Exception as exc:
                log.warning("bounce mailbox: keeping %s for the next poll: %r", about, exc)
                raise _Deferred from exc
        return len(bounces)


def _describe(message: Message) -> str:
    """Enough to find the message in the mailbox by hand."""
    fields = (
        f"{name} {header_value(message, name)!r}" for name in ("Message-ID", "From", "Subject")
    )
    return "message (" + ", ".join(fields) + ")"
