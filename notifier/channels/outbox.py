"""The outbox: the out-of-the-box channel when no SMTP host or SMS provider is configured.

Writes each message where a person can look at it, instead of sending it: an email as a
``.eml`` file holding exactly the RFC 5322 message the SMTP channel would send, an SMS as a
JSON line per number. A redelivery after a crash overwrites the same ``.eml`` file.

Messages that arrive together are written together (``batching.Batcher``): one thread hop
per batch, the SMS lines in one append, the ``.eml`` files each written under a temporary
name and renamed into place (a reader never sees half a message), by names relative to the
folder opened once per batch. Durability: a message counts as delivered once its
file is written (renamed into place, or the lines appended) and so survives the process
being killed (``kill -9``: the kernel holds the written data); it is not fsynced, so a power
loss may take the last files of a delivered job with it. The outbox is a stand-in for a
provider while developing, and an fsync per file costs several times the whole write
(``python -m bench.fsync``).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path

from notifier.batching import Batcher
from notifier.channels.base import Channel
from notifier.channels.mime import email_bytes
from notifier.errors import PermanentDeliveryError, TransientDeliveryError
from notifier.models import Message, Receipt

#: What writing one message came to: nothing, or the error it gets.
Written = OSError | ValueError | None

#: A new file, or an old one emptied (a redelivery after a crash): as ``open(..., "wb")``.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def _write_all(file: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(file, view) :]


class OutboxChannel(Channel):
    provider = "outbox"
    simulated = True

    def __init__(self, directory: Path, *, kind: str, sender: str = "notifier@localhost") -> None:
        self.directory = Path(directory)
        self.kind = kind
        self.sender = sender
        self._batcher: Batcher[Message, Written] = Batcher(self._write)

    async def send(self, message: Message) -> Receipt:
        failure = await self._batcher.put(message)
        if isinstance(failure, OSError):
            raise TransientDeliveryError(f"outbox: cannot write: {failure}") from failure
        if isinstance(failure, ValueError):
            raise PermanentDeliveryError(
                f"outbox: cannot build the message: {failure}"
            ) from failure
        return Receipt(provider_ids=dict.fromkeys(message.pending_to))

    async def aclose(self) -> None:
        await self._batcher.drain()

    async def _write(self, messages: Sequence[Message]) -> list[Written]:
        write = self._write_emails if self.kind == "email" else self._append_lines
        return await asyncio.to_thread(write, messages)

    def _write_emails(self, messages: Sequence[Message]) -> list[Written]:
        folder = self.directory / "email"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            return [exc] * len(messages)
        try:
            return [self._write_email(folder_fd, message) for message in messages]
        finally:
            os.close(folder_fd)

    def _write_email(self, folder_fd: int, message: Message) -> Written:
        try:
            data = email_bytes(message, self.sender)
            temporary = f".{message.id}.tmp"
            file = os.open(temporary, _CREATE, 0o666, dir_fd=folder_fd)
            try:
                _write_all(file, data)
            finally:
                os.close(file)
            os.replace(temporary, f"{message.id}.eml", src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        except (OSError, ValueError) as exc:
            return exc
        return None

    def _append_lines(self, messages: Sequence[Message]) -> list[Written]:
        lines = "".join(
            json.dumps(
                {"id": message.id, "channel": self.kind, "to": number, "text": message.text},
                ensure_ascii=False,
            )
            + "\n"
            for message in messages
            for number in message.pending_to
        )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / f"{self.kind}.jsonl", "a", encoding="utf-8") as file:
                file.write(lines)
        except OSError as exc:
            return [exc] * len(messages)
        return [None] * len(messages)
