"""Jinja2 templates: sandbox, strict variables, HTML-only escaping, reloading, check."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from notifier.cli import templates as templates_cli
from notifier.errors import InvalidRequest, TemplateError, UnknownTemplate
from notifier.templates import Rendered, Templates

WELCOME = """\
{% block subject %}欢迎 {{ name }} & co{% endblock %}
{% block text %}Hello {{ name }}, <this> stays as it is.{% endblock %}
{% block html %}<p>Hello {{ name }}</p>{% include "_signature.html.j2" %}{% endblock %}
"""


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    (folder / "billing").mkdir(parents=True)
    (folder / "welcome.email.j2").write_text(WELCOME, encoding="utf-8")
    (folder / "_signature.html.j2").write_text("<i>{{ team }}</i>", encoding="utf-8")
    (folder / "code.sms.j2").write_text("\n  Your code is {{ code }}.\n", encoding="utf-8")
    (folder / "billing" / "paid.sms.j2").write_text("Paid: {{ amount }}", encoding="utf-8")
    return folder


def test_email_blocks_with_html_escaped_only_in_html(directory: Path) -> None:
    data = {"name": "<Ada & Bob>", "team": "<Ops>"}

    rendered = Templates(directory).render("welcome", "email", data)

    assert rendered == Rendered(
        subject="欢迎 <Ada & Bob> & co",
        text="Hello <Ada & Bob>, <this> stays as it is.",
        html="<p>Hello &lt;Ada &amp; Bob&gt;</p><i>&lt;Ops&gt;</i>",
    )


def test_sms_renders_whole_and_stripped(directory: Path) -> None:
    templates = Templates(directory)

    assert templates.render("code", "sms", {"code": "<1234>"}).text == "Your code is <1234>."
    assert templates.render("billing/paid", "sms", {"amount": "¥10"}).text == "Paid: ¥10"


def test_missing_variable_is_a_template_error(directory: Path) -> None:
    with pytest.raises(TemplateError, match="'name' is undefined"):
        Templates(directory).render("welcome", "email", {"team": "Ops"})


def test_unknown_template(directory: Path) -> None:
    with pytest.raises(UnknownTemplate, match="no template 'nope' for sms"):
        Templates(directory).render("nope", "sms", {})


@pytest.mark.parametrize(
    ("name", "channel"),
    [
        ("../secret", "sms"),
        ("/etc/passwd", "sms"),
        ("billing/../../x", "sms"),
        ("a.b", "sms"),
        ("", "sms"),
        ("code", "../sms"),
        ("code\\..\\x", "sms"),
    ],
)
def test_names_that_could_leave_the_directory_are_refused(
    name: str, channel: str, directory: Path
) -> None:
    (directory.parent / "secret.sms.j2").write_text("leaked", encoding="utf-8")

    with pytest.raises(InvalidRequest, match=r"template: .* is not a valid"):
        Templates(directory).render(name, channel, {})


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ data.__class__ }}",
        "{% set _ = data.names.append(1) %}{{ data.names }}",
        "{{ data.pop('x') }}",
    ],
)
def test_sandbox_escapes_are_refused(source: str, directory: Path) -> None:
    (directory / "evil.sms.j2").write_text(source, encoding="utf-8")

    with pytest.raises(TemplateError, match=r"unsafe|not safely callable|undefined"):
        Templates(directory).render("evil", "sms", {"data": {"names": [], "x": 1}})


def test_errors_in_the_template_become_template_errors(directory: Path) -> None:
    (directory / "broken.sms.j2").write_text("{{ 1 / zero }}", encoding="utf-8")
    (directory / "syntax.sms.j2").write_text("line one\n{% if %}", encoding="utf-8")
    templates = Templates(directory)

    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        templates.render("broken", "sms", {"zero": 0})
    with pytest.raises(TemplateError, match="syntax error on line 2"):
        templates.render("syntax", "sms", {})


def test_subject_must_be_one_line(directory: Path) -> None:
    (directory / "multi.email.j2").write_text(
        "{% block subject %}{{ a }}\n{{ b }}{% endblock %}", encoding="utf-8"
    )

    with pytest.raises(TemplateError, match="subject block must render to one line"):
        Templates(directory).render("multi", "email", {"a": "x", "b": "y"})


def rewrite(path: Path, text: str) -> None:
    """Change a file and move its mtime on, so the change shows whatever the clock grain."""
    before = path.stat().st_mtime
    path.write_text(text, encoding="utf-8")
    os.utime(path, (before + 10, before + 10))


def test_changed_files_are_picked_up(directory: Path) -> None:
    templates = Templates(directory)
    assert templates.render("code", "sms", {"code": 1}).text == "Your code is 1."

    rewrite(directory / "code.sms.j2", "Code: {{ code }}")

    assert templates.render("code", "sms", {"code": 1}).text == "Code: 1"


def test_reload_forgets_compiled_templates(directory: Path) -> None:
    templates = Templates(directory)
    assert templates.render("code", "sms", {"code": 1}).text == "Your code is 1."
    path = directory / "code.sms.j2"
    stat = path.stat()
    path.write_text("Reloaded {{ code }}", encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a change auto_reload cannot see

    assert templates.render("code", "sms", {"code": 1}).text == "Your code is 1."
    templates.reload()
    assert templates.render("code", "sms", {"code": 1}).text == "Reloaded 1"


def test_check_reports_each_problem(directory: Path) -> None:
    (directory / "syntax.sms.j2").write_text("{% for %}", encoding="utf-8")
    (directory / "empty.email.j2").write_text("no blocks at all", encoding="utf-8")
    (directory / "odd.name.sms.j2").write_text("hi", encoding="utf-8")
    templates = Templates(directory)

    problems = templates.check({"name": "Ada", "team": "Ops", "amount": 1})

    assert problems == [
        "code.sms.j2: 'code' is undefined",
        "empty.email.j2: an email template needs a subject, text or html block",
        "odd.name.sms.j2: not named NAME.CHANNEL.j2 (letters, digits, _ and - in each part)",
        "syntax.sms.j2: syntax error on line 1: Expected an expression, got 'end of statement"
        " block'",
    ]
    assert templates.check({"name": "Ada", "team": "Ops", "amount": 1, "code": 2}) == problems[1:]


def run_check(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    templates_cli.register(parser.add_subparsers())
    args = parser.parse_args(["templates", "check", *argv])
    code: int = args.handler(args)
    return code


def test_cli_check_passes_with_enough_data(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.dumps({"name": "Ada", "team": "Ops", "code": 1, "amount": 2})

    assert run_check("--dir", str(directory), "--data", data) == 0
    assert "4 templates" in capsys.readouterr().err


def test_cli_check_fails_on_problems_and_reads_data_files(
    directory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps({"name": "Ada", "team": "Ops"}), encoding="utf-8")

    assert run_check("--dir", str(directory), "--data", f"@{sample}") == 1
    out = capsys.readouterr().out.splitlines()
    assert out == ["billing/paid.sms.j2: 'amount' is undefined", "code.sms.j2: 'code' is undefined"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--data", "[1]"], "must be a JSON object"),
        (["--data", "{nope"], "--data"),
        (["--data", "@/nonexistent/sample.json"], "--data"),
    ],
)
def test_cli_check_usage_errors(
    argv: list[str], says: str, directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_check("--dir", str(directory), *argv) == 2
    assert says in capsys.readouterr().err


def test_cli_check_needs_an_existing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_check("--dir", str(tmp_path / "missing")) == 2
    assert "no such directory" in capsys.readouterr().err


def test_cli_check_defaults_to_the_settings(
    directory: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_TEMPLATES_DIR", str(directory))
    monkeypatch.chdir(directory)  # no .env here

    assert run_check("--data", '{"name": "x", "team": "y", "code": 1, "amount": 2}') == 0
    assert str(directory) in capsys.readouterr().err


def test_the_command_is_registered() -> None:
    from notifier.cli import COMMAND_MODULES

    assert "notifier.cli.templates" in COMMAND_MODULES
