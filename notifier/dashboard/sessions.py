"""Signed session cookies and the CSRF tokens tied to them.

The key is made per process and never stored: a restart signs everyone out, and no secret
needs configuring. A cookie is ``id.caller.issued.signature``, the caller being the name of
the token signed in with (``token2``: its place in the list, never its value) or ``-``; the
CSRF token of a session is an HMAC of its id, so a form is only good for the session that
rendered it.
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

from notifier.tokens import ANYONE, Tokens

COOKIE = "notifier_session"
#: How long a session lasts after sign-in.
MAX_AGE = 12 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    #: Who signed in (``"token 2"``; ``ANYONE`` when no token is asked for), None if no one.
    caller: str | None
    #: Set when this request made the session: the response must carry its cookie.
    new: bool = False

    @property
    def signed_in(self) -> bool:
        return self.caller is not None


class Sessions:
    def __init__(
        self,
        tokens: Sequence[SecretStr],
        *,
        max_age: float = MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tokens = Tokens(tokens)
        self._key = secrets.token_bytes(32)
        self._max_age = max_age
        self._clock = clock

    @property
    def required(self) -> bool:
        """Whether signing in is needed: only when the service itself asks for a token."""
        return self._tokens.required

    def caller(self, token: str) -> str | None:
        """Which token this is (compared as the protocol server compares), None if none."""
        return self._tokens.caller(token)

    def start(self, *, caller: str | None) -> Session:
        """A new session (a fresh id at sign-in, so an id seen before it is worth nothing)."""
        return Session(secrets.token_urlsafe(18), self._effective(caller), new=True)

    def cookie(self, session: Session) -> str:
        name = (session.caller or "-").replace(" ", "")
        body = f"{session.id}.{name}.{int(self._clock())}"
        return f"{body}.{self._sign(body)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie carries; None if it is missing, forged or too old."""
        if not cookie or cookie.count(".") != 3:
            return None
        body, signature = cookie.rsplit(".", 1)
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        session_id, name, issued = body.split(".")
        if not issued.isdigit() or self._clock() - int(issued) > self._max_age:
            return None
        caller = f"token {name[len('token') :]}" if name.startswith("token") else None
        return Session(session_id, self._effective(caller))

    def _effective(self, caller: str | None) -> str | None:
        return caller if self.required else ANYONE

    def csrf(self, session: Session) -> str:
        return self._sign(f"csrf:{session.id}")

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given, self.csrf(session))

    def _sign(self, text: str) -> str:
        digest = hmac.new(self._key, text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
