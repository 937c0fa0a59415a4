"""Signed session cookies and the CSRF tokens tied to them.

The key is made per process and never stored: a restart signs everyone out, and no secret
needs configuring. A cookie is ``id.signed_in.issued.signature``; the CSRF token of a session
is an HMAC of its id, so a form is only good for the session that rendered it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import SecretStr

COOKIE = "notifier_session"
#: How long a session lasts after sign-in.
MAX_AGE = 12 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    signed_in: bool
    #: Set when this request made the session: the response must carry its cookie.
    new: bool = False


class Sessions:
    def __init__(
        self,
        tokens: Sequence[SecretStr],
        *,
        max_age: float = MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tokens = [token.get_secret_value().encode() for token in tokens]
        self._key = secrets.token_bytes(32)
        self._max_age = max_age
        self._clock = clock

    @property
    def required(self) -> bool:
        """Whether signing in is needed: only when the service itself asks for a token."""
        return bool(self._tokens)

    def token_ok(self, token: str) -> bool:
        """Constant-time against every configured token, as the protocol server compares."""
        given = token.encode()
        return any([hmac.compare_digest(given, known) for known in self._tokens])

    def start(self, *, signed_in: bool) -> Session:
        """A new session (a fresh id at sign-in, so an id seen before it is worth nothing)."""
        return Session(secrets.token_urlsafe(18), signed_in or not self.required, new=True)

    def cookie(self, session: Session) -> str:
        body = f"{session.id}.{int(session.signed_in)}.{int(self._clock())}"
        return f"{body}.{self._sign(body)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie carries; None if it is missing, forged or too old."""
        if not cookie or cookie.count(".") != 3:
            return None
        body, signature = cookie.rsplit(".", 1)
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        session_id, signed_in, issued = body.split(".")
        if not issued.isdigit() or self._clock() - int(issued) > self._max_age:
            return None
        return Session(session_id, signed_in == "1" or not self.required)

    def csrf(self, session: Session) -> str:
        return self._sign(f"csrf:{session.id}")

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given, self.csrf(session))

    def _sign(self, text: str) -> str:
        digest = hmac.new(self._key, text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
