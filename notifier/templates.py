"""Jinja2 templates, rendered at intake in a sandbox with strict undefined variables.

``NAME.email.j2`` has blocks ``subject``, ``text`` and optionally ``html``; ``NAME.sms.j2``
renders whole as the SMS text. Rendering at intake means a bad template or a missing
variable is refused in the ``send`` answer, never discovered later by the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from notifier.errors import TemplateError, UnknownTemplate


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str | None = None
    text: str | None = None
    html: str | None = None


class Templates:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(self.directory)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
        )

    def reload(self) -> None:
        """Forget compiled templates (SIGHUP); changed files are also picked up on their own."""
        self._env.cache = None if self._env.cache is None else type(self._env.cache)(400)

    def render(self, name: str, channel: str, data: dict[str, Any]) -> Rendered:
        filename = f"{name}.{channel}.j2"
        try:
            template = self._env.get_template(filename)
        except jinja2.TemplateNotFound:
            raise UnknownTemplate(f"template: no template {name!r} for {channel}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {name!r}: {exc}") from None
        try:
            if channel != "email":
                return Rendered(text=template.render(data).strip())
            context = template.new_context(data)
            blocks = {
                block: "".join(render(context)).strip()
                for block, render in template.blocks.items()
                if block in ("subject", "text", "html")
            }
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {name!r}: {exc}") from None
        return Rendered(**blocks)
