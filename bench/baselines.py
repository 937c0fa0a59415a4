"""The common code notifier is compared with: one message, one call, as tutorials teach.

- email: ``smtplib.SMTP_SSL`` per message (connect, TLS, EHLO, MAIL, RCPT, DATA, QUIT), and
  Apprise's ``mailtos://`` with one ``notify`` per message (its email plugin does the same);
- SMS: ``requests.post`` of ihuyi's form per message, and Apprise's ``form://``.

Each returns a ``send(number)`` that sends message ``number`` and raises if it was refused.
TLS is verified everywhere: smtplib is given the sink's CA, and Apprise (which builds its
own ``ssl.create_default_context()``) finds it through ``SSL_CERT_FILE``, set for the bench
process only by ``trusting``; no client skips verification.
"""

from __future__ import annotations

import os
import smtplib
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path

import apprise
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


def smtplib_per_message(port: int, ca_file: Path) -> Send:
    context = ssl.create_default_context(cafile=str(ca_file))

    def send(number: int) -> None:
        message = EmailMessage()
        message["From"] = "Bench <bench@example.com>"
        message["To"] = f"Customer {number} <customer{number}@example.com>"
        message["Subject"] = f"Your order {number}"
        message.set_content(f"Thank you for your order. {mark(number)}")
        with smtplib.SMTP_SSL("127.0.0.1", port, context=context) as smtp:
            smtp.send_message(message)

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


def requests_per_message(url: str) -> Send:
    def send(number: int) -> None:
        form = {
            "account": "bench",
            "password": "bench-key",
            "mobile": f"138{number:08d}",
            "content": f"Code 1234. {mark(number)}",
            "format": "json",
        }
        answer = requests.post(url, data=form, timeout=10)
        answer.raise_for_status()
        if answer.json()["code"] != 2:
            raise RuntimeError(f"gateway refused message {number}: {answer.text}")

    return send


def apprise_form(port: int) -> Send:
    return _apprise(f"form://127.0.0.1:{port}/webservice/sms.php")
