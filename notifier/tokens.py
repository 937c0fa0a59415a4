"""The configured tokens, and which one a caller presented.

The protocol server and the dashboard's sign-in both ask here, so both compare the same way:
every token, each in constant time, and a match is named by its place in the list
(``"token 2"``) wherever it is logged or limited, never by its value.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr

#: The caller's name when the service asks for no token: everyone shares one name.
ANYONE = "anyone"


class Tokens:
    def __init__(self, tokens: Sequence[SecretStr]) -> None:
        self._known = [token.get_secret_value().encode() for token in tokens]

    @property
    def required(self) -> bool:
        return bool(self._known)

    def caller(self, token: str) -> str | None:
        """The name of the configured token ``token`` is, or None when it is none of them."""
        given = token.encode()
        matches = [hmac.compare_digest(given, known) for known in self._known]
        return f"token {matches.index(True) + 1}" if any(matches) else None
