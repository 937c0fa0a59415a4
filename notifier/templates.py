"""Jinja2 templates, rendered at intake in a sandbox with strict undefined variables.

``NAME.email.j2`` has blocks ``subject``, ``text`` and optionally ``html``; ``NAME.sms.j2``
renders whole as the SMS text. Rendering at intake means a bad template or a missing
variable is refused in the ``send`` answer, never discovered later by the dispatcher.

- Sandboxed (``ImmutableSandboxedEnvironment``): templates come from operators but render
  data from any app, so no attribute tricks reach Python internals or mutate the data.
- ``StrictUndefined``: a missing variable is a ``TemplateError``, never an empty string.
- Autoescaping only where the output is HTML: inside the ``html`` block (wrapped at compile
  time, as if it said ``{% autoescape true %}``) and in ``*.html.j2`` partials. Subject and
  text are plain text and stay unescaped; ``Markup`` values pass through as they are.
- Names are letters, digits, ``_`` and ``-``, with ``/`` between folders: no ``..``, no
  absolute paths. Files whose name starts with ``_`` are partials for ``include`` and
  ``extends``; ``check`` compiles them but does not render them alone.
- Changed files are picked up on their own (Jinja's ``auto_reload`` checks the mtime on each
  use); ``reload()``, called on SIGHUP, drops every compiled template at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from notifier.errors import InvalidRequest, TemplateError, UnknownTemplate

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(/[A-Za-z0-9_][A-Za-z0-9_-]*)*")
EMAIL_BLOCKS = ("subject", "text", "html")
SUFFIX = ".j2"


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str | None = None
    text: str | None = None
    html: str | None = None


class _Environment(ImmutableSandboxedEnvironment):
    """Compiles the ``html`` block of every template with autoescaping on."""

    def compile(
        self,
        source: str | nodes.Template,
        name: str | None = None,
        filename: str | None = None,
        raw: bool = False,
        defer_init: bool = False,
    ) -> Any:
        if isinstance(source, str):
            source = self.parse(source, name, filename)
        for block in source.find_all(nodes.Block):
            if block.name == "html":
                escape = nodes.Keyword("autoescape", nodes.Const(True))
                block.body = [nodes.ScopedEvalContextModifier([escape], block.body)]
        return super().compile(source, name, filename, raw, defer_init)  # type: ignore[call-overload]


def _escape_partials(name: str | None) -> bool:
    return name is not None and name.endswith(".html.j2")


def _describe(exc: Exception) -> str:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"syntax error on line {exc.lineno}: {exc.message}"
    if isinstance(exc, jinja2.TemplateError):
        return str(exc.message)
    return f"{type(exc).__name__}: {exc}"


def _valid_name(value: str) -> bool:
    return len(value) <= 200 and _NAME.fullmatch(value) is not None


class Templates:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._env = self._new_environment()

    def _new_environment(self) -> _Environment:
        return _Environment(
            loader=jinja2.FileSystemLoader(str(self.directory)),
            undefined=jinja2.StrictUndefined,
            autoescape=_escape_partials,
            auto_reload=True,
            keep_trailing_newline=False,
        )

    def reload(self) -> None:
        """Forget every compiled template (SIGHUP); the next render reads the files again."""
        self._env = self._new_environment()

    def render(self, name: str, channel: str, data: Mapping[str, Any]) -> Rendered:
        """Render ``NAME.CHANNEL.j2`` with ``data``.

        Raises ``InvalidRequest`` for a malformed name, ``UnknownTemplate`` when there is no
        such file, ``TemplateError`` for a syntax error, a missing variable, a sandbox
        violation or anything else the template does wrong.
        """
        for value, what in ((name, "template name"), (channel, "channel")):
            if not _valid_name(value):
                raise InvalidRequest(
                    f"template: {value!r} is not a valid {what} (letters, digits, _ and -,"
                    " / between folders)"
                )
        try:
            template = self._env.get_template(f"{name}.{channel}{SUFFIX}")
        except jinja2.TemplateNotFound:
            raise UnknownTemplate(f"template: no template {name!r} for {channel}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {name!r}: {_describe(exc)}") from None
        try:
            return _render(template, channel, data)
        except Exception as exc:  # anything a template does wrong with the data it got
            raise TemplateError(f"template {name!r}: {_describe(exc)}") from None

    def names(self) -> list[str]:
        """Every template file, partials included, relative to the directory."""
        if not self.directory.is_dir():
            return []
        return sorted(self._env.list_templates(filter_func=lambda n: n.endswith(SUFFIX)))

    def check(self, sample_data: Mapping[str, Any]) -> list[str]:
        """Compile every template and render each non-partial with ``sample_data``.

        Returns the problems, one line each (``welcome.email.j2: 'name' is undefined``);
        an empty list means every template is usable with such data.
        """
        problems = ((filename, self._problem(filename, sample_data)) for filename in self.names())
        return [f"{filename}: {problem}" for filename, problem in problems if problem]

    def _problem(self, filename: str, sample_data: Mapping[str, Any]) -> str | None:
        name, _, channel = filename.removesuffix(SUFFIX).rpartition(".")
        try:
            template = self._env.get_template(filename)
        except jinja2.TemplateError as exc:
            return _describe(exc)
        if PurePosixPath(filename).name.startswith("_"):
            return None
        if not (_valid_name(name) and _valid_name(channel)):
            return f"not named NAME.CHANNEL{SUFFIX} (letters, digits, _ and - in each part)"
        if channel == "email" and not any(block in template.blocks for block in EMAIL_BLOCKS):
            return "an email template needs a subject, text or html block"
        try:
            _render(template, channel, sample_data)
        except Exception as exc:  # reported, as render() would refuse it
            return _describe(exc)
        return None


def _render(template: jinja2.Template, channel: str, data: Mapping[str, Any]) -> Rendered:
    if channel != "email":
        return Rendered(text=template.render(data).strip())
    context = template.new_context(dict(data))
    blocks = {
        block: "".join(render(context)).strip()
        for block, render in template.blocks.items()
        if block in EMAIL_BLOCKS
    }
    if "\r" in blocks.get("subject", "") or "\n" in blocks.get("subject", ""):
        raise jinja2.TemplateRuntimeError("the subject block must render to one line")
    return Rendered(**blocks)
