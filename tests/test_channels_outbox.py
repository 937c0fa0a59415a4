"""The outbox channel: the ``.eml`` files and ``sms.jsonl`` lines it writes instead of sending."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from notifier.channels.mime import email_bytes
from notifier.channels.outbox import OutboxChannel
from notifier.errors import PermanentDeliveryError, TransientDeliveryError
from notifier.models import Message

SENDER = "通知中心 <notify@example.com>"


def job(number: int = 1, *, channel: str = "email", **fields: Any) -> Message:
    values: dict[str, Any] = {
        "id": f"job{number}",
        "channel": channel,
        "to": (f"+86138{number:08d}",) if channel == "sms" else ("张三 <zhang.san@example.com>",),
        "cc": ("li@example.com",),
        "subject": f"欢迎张三 order {number}",
        "text": "您好 张三。\n欢迎使用。",
        "message_id": f"<fixed.{number}@example.com>",
    }
    values.update(fields)
    return Message(**values)


def written_date(data: bytes) -> float:
    """The ``Date`` the outbox put in a message, as a timestamp."""
    line = next(line for line in data.split(b"\r\n") if line.startswith(b"Date: "))
    return parsedate_to_datetime(line.removeprefix(b"Date: ").decode()).timestamp()


async def test_the_eml_file_holds_exactly_what_smtp_sends(tmp_path: Path) -> None:
    message = job(html=None)  # no MIME boundary, which is random
    outbox = OutboxChannel(tmp_path, kind="email", sender=SENDER)

    await outbox.send(message)

    written = (tmp_path / "email" / "job1.eml").read_bytes()
    assert written == email_bytes(message, SENDER, date=written_date(written))
    assert written.isascii() and b"\r\n" in written


async def test_a_redelivery_overwrites_the_same_file_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    outbox = OutboxChannel(tmp_path, kind="email", sender=SENDER)
    await outbox.send(job(text="first"))

    await outbox.send(job(text="second"))

    assert [p.name for p in (tmp_path / "email").iterdir()] == ["job1.eml"]
    assert (tmp_path / "email" / "job1.eml").read_bytes().endswith(b"\r\n\r\nsecond\r\n")


async def test_a_file_it_cannot_write_fails_that_message_for_now_only(tmp_path: Path) -> None:
    (tmp_path / "email" / "job2.eml").mkdir(parents=True)  # a rename onto it fails
    outbox = OutboxChannel(tmp_path, kind="email", sender=SENDER)

    results = await asyncio.gather(
        *(outbox.send(job(n)) for n in (1, 2, 3)), return_exceptions=True
    )

    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], TransientDeliveryError)
    assert "outbox: cannot write" in str(results[1])
    assert not isinstance(results[2], BaseException)
    assert sorted(p.name for p in (tmp_path / "email").glob("*.eml")) == [
        "job1.eml",
        "job2.eml",
        "job3.eml",
    ]
    assert (tmp_path / "email" / "job2.eml").is_dir()


async def test_an_outbox_that_is_not_a_folder_fails_for_now(tmp_path: Path) -> None:
    (tmp_path / "outbox").write_text("not a folder")
    outbox = OutboxChannel(tmp_path / "outbox", kind="email", sender=SENDER)

    with pytest.raises(TransientDeliveryError, match="outbox: cannot write"):
        await outbox.send(job())


async def test_a_message_that_cannot_be_built_fails_for_good(tmp_path: Path) -> None:
    outbox = OutboxChannel(tmp_path, kind="email", sender=SENDER)

    with pytest.raises(PermanentDeliveryError, match="cannot build the message"):
        await outbox.send(job(subject="Hello\r\nBcc: victim@example.com"))

    assert list((tmp_path / "email").iterdir()) == []


@pytest.mark.parametrize("kind", ["email", "sms"])
async def test_the_outbox_writes_messages_sent_together_in_one_thread_hop(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops: list[object] = []
    real = asyncio.to_thread

    async def counted(function: Callable[..., Any], *args: Any) -> Any:
        hops.append(function)
        return await real(function, *args)

    monkeypatch.setattr("notifier.channels.outbox.asyncio.to_thread", counted)
    outbox = OutboxChannel(tmp_path, kind=kind, sender=SENDER)
    jobs = [job(n, channel=kind) for n in range(20)]

    await asyncio.gather(*(outbox.send(one) for one in jobs))
    await outbox.aclose()

    assert len(hops) < len(jobs)
    if kind == "email":
        assert sorted(p.name for p in (tmp_path / "email").iterdir()) == sorted(
            f"job{n}.eml" for n in range(20)
        )
    else:
        lines = (tmp_path / "sms.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["id"] for line in lines) == sorted(
            f"job{n}" for n in range(20)
        )
