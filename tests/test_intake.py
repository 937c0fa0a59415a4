"""Intake rules of version 1.1 over real connections: collapsing, priority, callback URLs."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from notifier.intake import collapse
from notifier.models import Message, isoformat, utcnow
from tests.support.server import LineConnection, running_server
from tests.support.waiting import wait_for


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/notifier.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def test_twenty_concurrent_sends_with_one_collapse_key_deliver_exactly_one(
    tmp_path: Path, database_url: str
) -> None:
    due = isoformat(utcnow() + timedelta(seconds=2))
    send = {
        "channel": "sms",
        "to": "+8613800138000",
        "collapse_key": "login-code",
        "send_at": due,
    }
    async with running_server(tmp_path, database_url=database_url) as server:
        conns = [await LineConnection.open(server.port) for _ in range(20)]
        answers = await asyncio.gather(
            *(c.request({**send, "text": f"code {i}"}) for i, c in enumerate(conns))
        )
        ids = [answer["id"] for answer in answers]
        conn = conns[0]

        async def settled() -> list[dict[str, Any]] | None:
            statuses = [await conn.status(job_id) for job_id in ids]
            final = all(s["status"] in ("delivered", "cancelled") for s in statuses)
            return statuses if final and any(s["status"] == "delivered" for s in statuses) else None

        statuses = await wait_for(settled, timeout=20, what="one delivered, the rest cancelled")
        delivered = [s for s in statuses if s["status"] == "delivered"]
        assert len(delivered) == 1
        for superseded in (s for s in statuses if s["status"] == "cancelled"):
            assert superseded["superseded_by"] in ids
        sent = (tmp_path / "outbox" / "sms.jsonl").read_text().splitlines()
        assert len(sent) == 1, "a superseded job never reaches a provider"
        for c in conns:
            await c.close()


async def test_collapsing_needs_the_same_recipients_and_channel(tmp_path: Path) -> None:
    later = isoformat(utcnow() + timedelta(hours=1))
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        base = {"channel": "sms", "text": "x", "collapse_key": "k", "send_at": later}
        first = await conn.request({**base, "to": ["+14155550101", "+14155550102"]})
        other = await conn.request({**base, "to": "+14155550103"})
        same = await conn.request({**base, "to": ["+14155550102", "+14155550101"]})
        assert (await conn.status(first["id"]))["superseded_by"] == same["id"]
        assert (await conn.status(other["id"]))["status"] == "queued"
        await conn.close()


def test_the_collapse_value_ignores_order_case_and_display_names() -> None:
    def email(*to: str) -> Message:
        return Message(id="x", channel="email", to=to)

    assert collapse(email("A <a@Example.com>", "b@example.com"), "k") == collapse(
        email("b@example.com", "a@example.com"), "k"
    )
    assert collapse(email("a@example.com"), "k") != collapse(email("a@example.com"), "other")
    assert collapse(email("a@example.com"), "k") != collapse(
        Message(id="x", channel="sms", to=("a@example.com",)), "k"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("priority", "urgent"),
        ("collapse_key", ""),
        ("collapse_key", "k" * 201),
        ("callback_url", "ftp://example.com/"),
        ("callback_url", "not a url"),
        ("callback_url", "http://example.com:99999/hook"),
    ],
)
async def test_bad_version_1_1_fields_are_refused_naming_them(
    tmp_path: Path, field: str, value: str
) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        answer = await conn.request(
            {"channel": "sms", "to": "+14155550101", "text": "x", field: value}
        )
        assert answer["error"]["code"] == "invalid_request"
        assert field in answer["error"]["message"]
        await conn.close()


async def test_status_carries_the_priority(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        plain = await conn.request({"channel": "sms", "to": "+14155550101", "text": "x"})
        urgent = await conn.request(
            {"channel": "sms", "to": "+14155550101", "text": "x", "priority": "high"}
        )
        assert (await conn.status(plain["id"]))["priority"] == "normal"
        assert (await conn.status(urgent["id"]))["priority"] == "high"
        await conn.close()
