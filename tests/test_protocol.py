"""The protocol's field checks: the fast paths give what the full ones would."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from notifier.errors import InvalidRequest
from notifier.protocol import _NAMED_ADDRESS, check_mailbox, parsed_mailbox


def _atoms(alphabet: str, separator: str) -> st.SearchStrategy[str]:
    """Words of ``alphabet``, now and then one with characters the parser reads otherwise."""
    atom = st.text(alphabet, min_size=1, max_size=8) | st.text(alphabet + SPECIAL, max_size=3)
    return st.lists(atom, min_size=1, max_size=3).map(separator.join)


WORD = "abcXYZ019"
SPECIAL = " .,;:@<>()[]\\\"'\t"
NAMED = st.builds(
    "{} <{}@{}>".format,
    _atoms(WORD, " "),
    _atoms(WORD + "_%+-", "."),
    _atoms(WORD + "-", "."),
)


@given(NAMED)
def test_a_mailbox_the_fast_check_takes_is_one_the_parser_takes_as_given(value: str) -> None:
    assume(_NAMED_ADDRESS.match(value))
    assert parsed_mailbox(value, "to") == value


@pytest.mark.parametrize(
    "value",
    [
        "Ada Lovelace <ada@example.com>",
        "Customer 7 <customer7@example.com>",
        '"Lovelace, Ada" <ada@example.com>',
        "  Ada <ada@example.com>  ",
    ],
)
def test_named_mailboxes_are_taken_as_the_parser_takes_them(value: str) -> None:
    assert check_mailbox(value, "to") == parsed_mailbox(value, "to")


@pytest.mark.parametrize(
    "value", ["Ada <ada@>", "Ada <@example.com>", "Ada <a da@example.com>", "Ada <ada>"]
)
def test_named_mailboxes_without_an_address_are_refused(value: str) -> None:
    with pytest.raises(InvalidRequest, match=r"to: .* is not an email address"):
        check_mailbox(value, "to")
