"""Fuzzing: random and hostile lines over a live connection, random data into templates.

The protocol promises that bad input is only ever answered: each line gets exactly one
answer (none for a blank line), with a known error code or as accepted, the connection
stays open, and other connections never notice. ``internal`` is not a known code here: it
means a request reached code that did not expect it, which is the bug this looks for.

Hypothesis runs derandomized with bounded examples, so CI sees the same cases every run;
the ``@example`` cases are the extremes (and the crashes fuzzing found) that always run.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from notifier.errors import ErrorCode, InvalidRequest, TemplateError, UnknownTemplate
from notifier.protocol import OPS
from notifier.templates import EMAIL_BLOCKS, Templates
from tests.support.server import LineConnection, RunningServer, running_server
from tests.support.waiting import wait_for

#: The codes a server may answer with; ``internal`` is a bug, ``connection`` client-only.
KNOWN_CODES = frozenset(ErrorCode) - {ErrorCode.INTERNAL, ErrorCode.CONNECTION}
TOKEN = "fuzz-token"
SENTINEL = {"op": "ping", "ref": "fuzz-sentinel-5e1d"}
SENTINEL_ANSWER = {"ok": True, "ref": SENTINEL["ref"]}

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[
        # One live service serves every example of a test, on purpose.
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

EMAIL: dict[str, Any] = {
    "channel": "email",
    "to": "ada@example.com",
    "subject": "Hi",
    "text": "Hello",
}
SMS: dict[str, Any] = {"channel": "sms", "to": "+14155550101", "text": "code 1234"}
TEMPLATED: dict[str, Any] = {
    "channel": "email",
    "to": "ada@example.com",
    "template": "welcome",
    "data": {"name": "Ada", "items": ["a", "b"]},
}
#: A valid request of each op, for fields to be spoiled one at a time.
VALID: dict[str, dict[str, Any]] = {
    "send": EMAIL,
    "status": {"op": "status", "id": "0" * 32},
    "cancel": {"op": "cancel", "id": "0" * 32},
    "ping": {"op": "ping"},
    "auth": {"op": "auth", "token": TOKEN},
    "jobs": {"op": "jobs", "status": "failed", "since": "1h", "limit": 5},
    "retry": {"op": "retry", "since": "1h"},
    "purge": {"op": "purge", "older_than": "30d"},
    "suppressions": {"op": "suppressions"},
    "suppress": {"op": "suppress", "address": "x@example.com", "reason": "fuzz"},
    "unsuppress": {"op": "unsuppress", "address": "x@example.com"},
}
FIELDS = sorted(
    {field for request in VALID.values() for field in request}
    | {"ref", "token", "cc", "bcc", "reply_to", "html", "idempotency_key", "send_at"}
    | {"priority", "collapse_key", "callback_url", "template", "data"}
)

HOSTILE_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\r\n",
        "x@example.com\r\nBcc: victim@example.com",
        "\u202e\ufeff",
        "\U0001d518\U0001d52b 张三",
        "../../../etc/passwd",
        "{{ ''.__class__.__mro__ }}",
        "=?utf-8?b?w6k=?= <a@example.com>",
        "+" + "9" * 40,
        "a" * 10_000,
        "http://[::1",
        "javascript:alert(1)",
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+23:59",
        "0001-01-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "10000-01-01T00:00:00Z",
        "999999999999999999999d",
        "1e400s",
    ]
)
HOSTILE_NUMBERS = st.sampled_from(
    [0, -1, 2**31, 2**63, -(2**63) - 1, 2**64, 10**30, 1e308, -1e308, 5e-324, 0.5]
)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
    | HOSTILE_TEXT
    | HOSTILE_NUMBERS
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=30,
)


def line_of(request: dict[str, Any]) -> bytes:
    return json.dumps(request, ensure_ascii=False).encode()


def assert_known_answer(answer: dict[str, Any]) -> None:
    assert answer["ok"] in (True, False), answer
    json.dumps(answer, allow_nan=False)  # strict JSON: no NaN or Infinity a client may choke on
    if answer["ok"] is False:
        error = answer["error"]
        assert error["code"] in KNOWN_CODES and error["message"], answer


@dataclass
class Live:
    """One service for every example: a connection to fuzz and one that only pings."""

    server: RunningServer
    fuzzed: LineConnection
    watcher: LineConnection

    async def exchange(
        self, line: bytes, *, on: LineConnection | None = None
    ) -> list[dict[str, Any]]:
        """Send ``line`` with a ping behind it; its answers are what came before the ping's."""
        conn = on or self.fuzzed
        await conn.send(line + b"\n", SENTINEL)
        answers = []
        while (answer := await conn.answer(timeout=60)) != SENTINEL_ANSWER:
            answers.append(answer)
        expected = 1 if line.strip() else 0
        assert len(answers) == expected, (line[:200], answers)
        for answer in answers:
            assert_known_answer(answer)
            if answer["ok"] and "id" in answer:
                await self.fuzzed.status(answer["id"])  # accepted means stored readably
        assert await self.watcher.request({"op": "ping"}) == {"ok": True}
        return answers


@pytest.fixture
def store(request: pytest.FixtureRequest) -> dict[str, str]:
    """SQLite, unless a test parametrizes ``store`` with ``"postgres"``."""
    if getattr(request, "param", "sqlite") == "postgres":
        return {"database_url": request.getfixturevalue("postgres_url")}
    return {}


@pytest.fixture
async def live(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, store: dict[str, str]
) -> AsyncIterator[Live]:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "welcome.email.j2").write_text(
        "{% block subject %}Hi {{ name }}{% endblock %}"
        "{% block text %}{% for item in items %}{{ item }} {% endfor %}{% endblock %}"
        "{% block html %}<p>{{ name }}</p>{% endblock %}"
    )
    (templates / "code.sms.j2").write_text("Your code is {{ code }}")
    async with running_server(tmp_path, auth_tokens=TOKEN, **store) as server:
        fuzzed = await LineConnection.open(server.port)
        assert await fuzzed.request({"op": "auth", "token": TOKEN}) == {"ok": True}
        watcher = await LineConnection.open(server.port)
        yield Live(server, fuzzed, watcher)
        sent = await fuzzed.request(EMAIL)

        async def delivered() -> bool:
            return (await fuzzed.status(sent["id"]))["status"] == "delivered"

        await wait_for(delivered, timeout=60, what="a plain email delivered after the fuzzing")
        await fuzzed.close()
        await watcher.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


@FUZZ
@given(line=st.binary(max_size=4096).map(lambda raw: raw.replace(b"\n", b"")))
@example(line=b"\xff\xfe{}")
@example(line=b" \t\r")
@example(line=b"\x00" * 100)
async def test_random_bytes_are_answered(live: Live, line: bytes) -> None:
    await live.exchange(line)


@FUZZ
@given(value=JSON_VALUES, ascii_only=st.booleans())
async def test_json_of_any_shape_is_answered(live: Live, value: Any, ascii_only: bool) -> None:
    await live.exchange(json.dumps(value, ensure_ascii=ascii_only).encode())


@FUZZ
@given(depth=st.integers(1, 50_000), opener=st.sampled_from([b"[", b'{"a":', b'{"data":']))
@example(depth=100_000, opener=b"[")
async def test_deep_json_is_answered(live: Live, depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    await live.exchange(opener * depth + b"1" + closer * depth)


@FUZZ
@given(
    count=st.integers(0, 100_000),
    where=st.sampled_from(["to", "cc", "data", "ref", "top"]),
)
async def test_huge_json_is_answered(live: Live, count: int, where: str) -> None:
    if where == "top":
        request: Any = {f"k{n}": n for n in range(min(count, 20_000))}
    elif where == "data":
        request = {**EMAIL, "data": {f"k{n}": [n] for n in range(count)}}
    else:
        request = {**EMAIL, where: list(range(count))}
    await live.exchange(line_of(request))


@st.composite
def spoiled_requests(draw: st.DrawFn) -> bytes:
    """A valid request of some op with fields replaced, added or dropped at random."""
    op = draw(st.sampled_from(OPS) | st.text(max_size=10))
    request = dict(VALID.get(op, {"op": op}))
    if op not in VALID:
        request["op"] = op
    for field in draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=8), max_size=4)):
        if draw(st.booleans()) or field not in request:
            request[field] = draw(JSON_VALUES)
        else:
            del request[field]
    return line_of(request)


MANY_EMAILS = [f"user{n}@example.com" for n in range(20_000)]
MANY_NUMBERS = [f"+1415{n:07d}" for n in range(20_000)]


@FUZZ
@given(line=spoiled_requests())
@example(line=line_of({**EMAIL, "to": MANY_EMAILS}))
@example(line=line_of({**SMS, "to": MANY_NUMBERS}))
@example(line=line_of({**EMAIL, "subject": "主" * 330_000}))
@example(line=line_of({**EMAIL, "text": "x" * 1_000_000}))
@example(line=line_of({**EMAIL, "subject": "x" * 10_000_000}))
@example(line=line_of({**EMAIL, "send_at": "9999-12-31T23:59:59Z"}))
@example(line=line_of({**EMAIL, "send_at": "9999-12-31T23:59:59-23:59"}))
@example(line=line_of({**EMAIL, "send_at": "0001-01-01T00:00:00+23:59"}))
@example(line=line_of({**EMAIL, "send_at": "0001-01-01T00:00:00Z"}))
@example(line=line_of({**EMAIL, "send_at": 10**20}))
@example(line=line_of({**TEMPLATED, "data": {"name": {"__class__": 1}, "items": "abc"}}))
@example(line=line_of({"op": "jobs", "since": "99999999999999d"}))
@example(line=line_of({"op": "jobs", "since": "1000000d"}))
@example(line=line_of({"op": "jobs", "since": 1e308}))
@example(line=line_of({"op": "jobs", "since": "9999-12-31T23:59:59-23:59"}))
@example(line=line_of({"op": "retry", "since": 10**400}))
@example(line=line_of({"op": "purge", "older_than": "99999999999999999w"}))
@example(line=b'{"op": "ping", "ref": 1e400}')
@example(line=b'{"op": "ping", "ref": NaN}')
@example(line=b'{"op": "ping", "ref": -Infinity}')
async def test_every_field_with_wrong_types_and_extreme_values(live: Live, line: bytes) -> None:
    await live.exchange(line)


@FUZZ
@given(line=spoiled_requests())
@example(line=line_of({**EMAIL, "token": ""}))
@example(line=line_of({**EMAIL, "token": TOKEN[:-1]}))
@example(line=line_of({**EMAIL, "token": TOKEN + "\x00"}))
@example(line=line_of({"op": "purge", "older_than": "0s", "token": [TOKEN]}))
async def test_without_a_token_nothing_but_ping_is_done(live: Live, line: bytes) -> None:
    stranger = await LineConnection.open(live.server.port)
    try:
        answers = await live.exchange(line, on=stranger)
    finally:
        await stranger.close()
    request = json.loads(line)
    if answers and answers[0]["ok"] and request.get("token") != TOKEN:
        assert request.get("op") == "ping", (request, answers)


@pytest.mark.postgres
@pytest.mark.parametrize("store", ["postgres"], indirect=True)
@settings(FUZZ, max_examples=60)
@given(line=spoiled_requests())
@example(line=line_of({**EMAIL, "send_at": "0001-01-01T00:00:00Z"}))
@example(line=line_of({**EMAIL, "send_at": "9999-12-31T23:59:59.999999Z"}))
@example(line=line_of({"op": "jobs", "since": "0001-01-01T00:00:00Z"}))
@example(line=line_of({**EMAIL, "to": MANY_EMAILS}))
async def test_every_field_on_postgresql(live: Live, line: bytes) -> None:
    await live.exchange(line)


# Templates: operators write them, but any app's data goes in.

UNSAFE_ATTRIBUTES = [
    "__class__",
    "__mro__",
    "__subclasses__",
    "__globals__",
    "__builtins__",
    "__init__",
    "__dict__",
    "__code__",
    "__self__",
    "__func__",
    "__getattribute__",
    "__reduce_ex__",
    "_TemplateReference__context",
    "gi_frame",
    "f_globals",
    "mro",
    "environment",
    "globals",
    "format",
    "format_map",
    "update",
    "append",
    "pop",
    "clear",
    "setdefault",
    "keys",
    "upper",
    "name",
]
FILTERS = [
    "string",
    "safe",
    "e",
    "list",
    "join",
    "first",
    "tojson",
    "pprint",
    "length",
    "sort",
    "reverse",
    "int",
    "float",
    "default('x')",
    "map('upper')",
    "map(attribute='__class__')",
    "attr('__class__')",
    "selectattr('__class__')",
    "groupby('__class__')",
    "format('%s %s')",
    "truncate(3)",
    "batch(2)",
    "dictsort",
    "xmlattr",
    "unique",
    "sum",
]
ROOTS = ["x", "items", "user", "self", "lipsum", "cycler", "joiner", "namespace", "range", "dict"]
ROOTS += ["loop", "''", "0", "[]", "{}", "none", "'{0.__class__}'"]


def _extend(expression: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    attribute = st.sampled_from(UNSAFE_ATTRIBUTES)
    return st.one_of(
        st.tuples(expression, attribute).map(lambda p: f"{p[0]}.{p[1]}"),
        st.tuples(expression, attribute).map(lambda p: f"{p[0]}[{p[1]!r}]"),
        st.tuples(expression, st.sampled_from(FILTERS)).map(lambda p: f"({p[0]})|{p[1]}"),
        expression.map(lambda e: f"{e}()"),
        st.tuples(expression, expression).map(lambda p: f"'{{0}}{{1}}'.format({p[0]}, {p[1]})"),
        st.tuples(expression, expression).map(lambda p: f"({p[0]} ~ {p[1]})"),
    )


EXPRESSIONS = st.recursive(st.sampled_from(ROOTS), _extend, max_leaves=6)
STATEMENTS = st.one_of(
    EXPRESSIONS.map(lambda e: f"{{{{ {e} }}}}"),
    EXPRESSIONS.map(lambda e: f"{{% for i in {e} %}}{{{{ i }}}}{{% endfor %}}"),
    EXPRESSIONS.map(lambda e: f"{{% set ns = namespace(a={e}) %}}{{{{ ns.a }}}}"),
    EXPRESSIONS.map(lambda e: f"{{% if {e} %}}yes{{% endif %}}"),
    st.sampled_from(
        [
            "{% include '../outside.sms.j2' %}",
            "{% include '/etc/passwd' %}",
            "{% extends '../outside.sms.j2' %}",
            "{% import 'os' as os %}{{ os }}",
            "{{ range(10**9)|list }}",
        ]
    ),
    st.text(alphabet="{}%#()[]'\". |~x_", max_size=30),
)
SOURCES = st.lists(STATEMENTS, min_size=1, max_size=4).map("".join)
TEMPLATE_DATA = st.dictionaries(
    st.sampled_from(["x", "items", "user", "name", "code", "self", "__class__"]),
    JSON_VALUES,
    max_size=5,
)

#: Output that only a template outside its sandbox could produce.
ESCAPE_MARKS = (
    "CANARY-outside",
    "<module ",
    "<built-in function",
    "<frame ",
    "<code object",
    "__builtins__",
    "root:x:0:0",
    "uid=",
    "_wrap_close",
)


@pytest.fixture
def templates(tmp_path: Path) -> Iterator[Templates]:
    (tmp_path / "outside.sms.j2").write_text("CANARY-outside")
    (tmp_path / "templates").mkdir()
    yield Templates(tmp_path / "templates")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.sms.j2", "templates"]


_names = itertools.count()


@settings(FUZZ, max_examples=400)
@given(source=SOURCES, data=TEMPLATE_DATA, channel=st.sampled_from(["sms", "email"]))
@example(source="{{ x.__class__.__mro__[1].__subclasses__() }}", data={"x": 1}, channel="sms")
@example(source="{{ lipsum.__globals__['os'].popen('id').read() }}", data={}, channel="sms")
@example(source="{{ cycler.__init__.__globals__.os }}", data={}, channel="sms")
@example(source="{{ '{0.__class__.__base__}'.format(x) }}", data={"x": ""}, channel="sms")
@example(source="{{ items.append(1) }}{{ user.update(a=1) }}", data={}, channel="sms")
@example(source="{% block subject %}{{ x }}{% endblock %}", data={"x": "a\nb"}, channel="email")
def test_random_templates_and_data_stay_in_the_sandbox(
    templates: Templates, source: str, data: dict[str, Any], channel: str
) -> None:
    name = f"fuzz{next(_names)}"
    if channel == "email":
        source = "".join(f"{{% block {block} %}}{source}{{% endblock %}}" for block in EMAIL_BLOCKS)
    (templates.directory / f"{name}.{channel}.j2").write_text(source)
    given_data = {"items": [1, 2], "user": {"name": "ada"}, **data}
    before = copy.deepcopy(given_data)
    try:
        rendered = templates.render(name, channel, given_data)
    except TemplateError:
        pass
    else:
        for text in (rendered.subject, rendered.text, rendered.html):
            assert not any(mark in (text or "") for mark in ESCAPE_MARKS), text
    assert given_data == before, "a template changed the data it was given"


@FUZZ
@given(name=st.text(max_size=40), channel=st.text(max_size=10), data=TEMPLATE_DATA)
@example(name="../outside", channel="sms", data={})
@example(name="/etc/passwd", channel="sms", data={})
@example(name="templates/../../outside", channel="sms", data={})
def test_any_template_name_is_refused_or_found_inside_the_directory(
    templates: Templates, name: str, channel: str, data: dict[str, Any]
) -> None:
    try:
        rendered = templates.render(name, channel, data)
    except (InvalidRequest, UnknownTemplate, TemplateError):
        return
    assert "CANARY" not in (rendered.text or ""), "a template outside the directory was read"
