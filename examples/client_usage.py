"""The public client API in use; mypy checks this file, so it stays true to the API.

Run it against a server (``notifier serve`` in another terminal)::

    python examples/client_usage.py

It finds the server through NOTIFIER_HOST, NOTIFIER_PORT and NOTIFIER_TOKEN, like the CLI.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from notifier import (
    AsyncClient,
    Client,
    JobInfo,
    JobStatus,
    NotFound,
    NotifierConnectionError,
    NotifierError,
    SendResult,
    UnknownTemplate,
)


def blocking() -> None:
    with Client() as client:  # or Client("127.0.0.1", 7725, token="...", ca_file="ca.pem")
        client.ping()
        job_id: str = client.send_email(
            ["ada@example.com", "张三 <zhang.san@example.com>"],
            subject="Welcome",
            text="Hello!",
            html="<p>Hello!</p>",
            reply_to="support@example.com",
        )
        info: JobInfo = client.wait(job_id, timeout=30)
        print(job_id, info.status.value, info.attempts, info.updated_at.isoformat())

        code = client.send_sms("+14155550101", text="Code: 1234", idempotency_key="login-42")
        later = client.send(
            channel="sms",
            to="+14155550101",
            text="Your table is ready",
            send_at=datetime.now(UTC) + timedelta(hours=1),
        )
        client.cancel(later)
        assert client.status(later).status is JobStatus.CANCELLED
        print(code, later)

        try:
            client.status("no-such-job")
        except NotFound as exc:
            print("as expected:", exc.code, exc.message)
        try:
            client.send_sms("+14155550101", template="no-such-template")
        except UnknownTemplate as exc:
            print("as expected:", exc.code, exc.message)


def batch() -> None:
    jobs = [{"channel": "sms", "to": "+14155550101", "text": f"#{i}"} for i in range(1000)]
    with Client() as client:
        results: list[SendResult] = client.send_many(jobs)
    failed = [(i, r.error) for i, r in enumerate(results) if r.error is not None]
    print(f"{len(results) - len(failed)} stored, {len(failed)} refused", failed[:3])


async def concurrent() -> None:
    async with AsyncClient() as client:
        await client.ping()
        ids = await asyncio.gather(
            *(client.send_sms("+14155550101", text=f"hello {n}") for n in range(10))
        )
        results = await client.send_many(
            {"channel": "email", "to": f"user{n}@example.com", "subject": "Hi", "text": "Hello"}
            for n in range(100)
        )
        final = await client.wait(ids[0], timeout=30)
        print(final.status is JobStatus.DELIVERED, sum(r.ok for r in results))


def main() -> None:
    try:
        blocking()
        batch()
        asyncio.run(concurrent())
    except NotifierConnectionError as exc:
        raise SystemExit(f"is the server running? {exc}") from None
    except NotifierError as exc:
        raise SystemExit(f"error: {exc.code}: {exc.message}") from None


if __name__ == "__main__":
    main()
