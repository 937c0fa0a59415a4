"""The outbox: the out-of-the-box channel when no SMTP host or SMS provider is configured.

Writes each message where a person can look at it, instead of sending it: an email as a
``.eml`` file holding exactly the RFC 5322 message the SMTP channel would send, an SMS as a
JSON line per number. A redelivery after a crash overwrites the same ``.eml`` file.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from notifier.channels.base import Channel
from notifier.channels.mime import build_email
from notifier.errors import PermanentDeliveryError, TransientDeliveryError
from notifier.models import Message, Receipt


class OutboxChannel(Channel):
    provider = "outbox"
    simulated = True

    def __init__(self, directory: Path, *, kind: str, sender: str = "notifier@localhost") -> None:
        self.directory = Path(directory)
        self.kind = kind
        self.sender = sender
        self._lock = asyncio.Lock()

    async def send(self, message: Message) -> Receipt:
        try:
            if self.kind == "email":
                await asyncio.to_thread(self._write_email, message)
            else:
                async with self._lock:
                    await asyncio.to_thread(self._append_line, message)
        except OSError as exc:
            raise TransientDeliveryError(f"outbox: cannot write: {exc}") from exc
        except ValueError as exc:
            raise PermanentDeliveryError(f"outbox: cannot build the message: {exc}") from exc
        return Receipt(provider_ids=dict.fromkeys(message.pending_to))

    def _write_email(self, message: Message) -> None:
        folder = self.directory / "email"
        folder.mkdir(parents=True, exist_ok=True)
        data = bytes(build_email(message, self.sender))
        temporary = folder / f".{message.id}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, folder / f"{message.id}.eml")

    def _append_line(self, message: Message) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = "".join(
            json.dumps(
                {"id": message.id, "channel": self.kind, "to": number, "text": message.text},
                ensure_ascii=False,
            )
            + "\n"
            for number in message.pending_to
        )
        with open(self.directory / f"{self.kind}.jsonl", "a", encoding="utf-8") as file:
            file.write(lines)
