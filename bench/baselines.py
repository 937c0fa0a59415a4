"""The common code notifier is compared with: one message, one call, as tutorials teach.

- email: ``smtplib.SMTP_SSL`` per message (connect, TLS, EHLO, MAIL, RCPT, DATA, QUIT), and
  Apprise's ``mailtos://`` with one ``notify`` per message (its email plugin does the same);
- SMS: ``requests.post`` of ihuyi's form per message, and Apprise's ``form://``.

Each returns a ``send(number)`` that sends message ``number`` and raises if it was refused.

The cost-per-job scenarios (``bench.cost``) also compare notifier with the bare async clients
it is built on, each as lean as its library allows: ``aiohttp_posts``, ``httpx_posts`` (plain
or over the ``httpx-aiohttp`` transport), ``aiosmtplib_sessions``; each sends ``count``
messages with a fixed number in flight and returns nothing (the sink counts them).
TLS is verified everywhere: smtplib is given the sink's CA, and Apprise (which builds its
own ``ssl.create_default_context()``) finds it through ``SSL_CERT_FILE``, set for the bench
process only by ``trusting``; no client skips verification.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import aiosmtplib
import apprise
import httpx
import requests

from bench.marks import mark

Send = Callable[[int], None]


@contextmanager
def trusting(ca_file: Path) -> Iterator[None]:
    """Make default TLS contexts of this process trust only ``ca_file`` for a while."""
    before = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(ca_file)
    try:
        yield
    finally:
        if before is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = before


def email_message(number: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Bench <bench@example.com>"
    message["To"] = f"Customer {number} <customer{number}@example.com>"
    message["Subject"] = f"Your order {number}"
    message.set_content(f"Thank you for your order. {mark(number)}")
    return message


def smtplib_per_message(port: int, ca_file: Path) -> Send:
    context = ssl.create_default_context(cafile=str(ca_file))

    def send(number: int) -> None:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=context) as smtp:
            smtp.send_message(email_message(number))

    return send


def _apprise(url: str) -> Send:
    """A fresh ``Apprise`` per message, as a request handler would build it: a reused one
    throttles its email plugin to one message per 5.5 s (``request_rate_per_sec``), which
    would measure Apprise's politeness, not its cost."""

    def send(number: int) -> None:
        notifier = apprise.Apprise()
        if not notifier.add(url):
            raise ValueError(f"Apprise does not take {url}")
        if not notifier.notify(title=f"Your order {number}", body=f"Code 1234. {mark(number)}"):
            raise RuntimeError(f"Apprise failed to send message {number}")

    return send


def apprise_email(port: int) -> Send:
    return _apprise(
        f"mailtos://127.0.0.1:{port}?mode=ssl&from=bench@example.com&to=customer@example.com"
    )


def ihuyi_form(number: int) -> dict[str, str]:
    return {
        "account": "bench",
        "password": "bench-key",
        "mobile": f"138{number:08d}",
        "content": f"Code 1234. {mark(number)}",
        "format": "json",
    }


def requests_per_message(url: str) -> Send:
    def send(number: int) -> None:
        answer = requests.post(url, data=ihuyi_form(number), timeout=10)
        answer.raise_for_status()
        if answer.json()["code"] != 2:
            raise RuntimeError(f"gateway refused message {number}: {answer.text}")

    return send


def apprise_form(port: int) -> Send:
    return _apprise(f"form://127.0.0.1:{port}/webservice/sms.php")


async def _in_flight(count: int, workers: int, send: Callable[[int], Awaitable[None]]) -> None:
    """Messages 0..count-1, ``workers`` at a time, each worker taking the next number."""
    numbers = iter(range(count))

    async def worker() -> None:
        for number in numbers:
            await send(number)

    await asyncio.gather(*(worker() for _ in range(workers)))


def _gateway_accepted(number: int, code: object) -> None:
    if code != 2:
        raise RuntimeError(f"gateway refused message {number}: code {code}")


async def aiohttp_posts(url: str, count: int, *, in_flight: int) -> None:
    """ihuyi's form with aiohttp: one session, ``in_flight`` keep-alive connections."""
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(number: int) -> None:
            async with session.post(url, data=ihuyi_form(number)) as answer:
                answer.raise_for_status()
                _gateway_accepted(number, (await answer.json(content_type=None))["code"])

        await _in_flight(count, in_flight, send)


async def httpx_posts(url: str, count: int, *, in_flight: int, aiohttp_transport: bool) -> None:
    """ihuyi's form with one ``httpx.AsyncClient``: its own pool of ``in_flight``
    connections, or the ``httpx-aiohttp`` transport under it."""
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    if aiohttp_transport:
        from httpx_aiohttp import AiohttpTransport

        transport: httpx.AsyncBaseTransport = AiohttpTransport(limits=limits)
    else:
        transport = httpx.AsyncHTTPTransport(limits=limits)
    async with httpx.AsyncClient(transport=transport) as client:

        async def send(number: int) -> None:
            answer = await client.post(url, data=ihuyi_form(number))
            answer.raise_for_status()
            _gateway_accepted(number, answer.json()["code"])

        await _in_flight(count, in_flight, send)


async def aiosmtplib_sessions(port: int, ca_file: Path, count: int, *, sessions: int) -> None:
    """``count`` messages over ``sessions`` implicit-TLS sessions, each kept for many."""
    context = ssl.create_default_context(cafile=str(ca_file))
    clients = [
        aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=True, tls_context=context)
        for _ in range(sessions)
    ]
    await asyncio.gather(*(client.connect() for client in clients))
    idle = list(clients)

    async def send(number: int) -> None:
        client = idle.pop()
        try:
            await client.send_message(email_message(number))
        finally:
            idle.append(client)

    try:
        await _in_flight(count, sessions, send)
    finally:
        await asyncio.gather(*(client.quit() for client in clients))
