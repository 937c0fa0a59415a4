"""``notifier templates check``: render every template with sample data before deploying.

Exit 0 when every template renders, 1 when any has a problem (each printed on one line),
2 when the command itself is misused (bad ``--data``, bad settings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from notifier.settings import SettingsError, load_settings
from notifier.templates import Templates


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "templates",
        help="work with the message templates",
        description="Work with the Jinja2 templates in NOTIFIER_TEMPLATES_DIR.",
    )
    commands = parser.add_subparsers(dest="templates_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="render every template with sample data and report problems",
        description="Compile every template and render each one with the sample data; a"
        " missing variable, a syntax error or a sandbox violation is reported. Exits 1 on"
        " any problem.",
    )
    check.add_argument(
        "--dir", type=Path, help="the templates directory (default: NOTIFIER_TEMPLATES_DIR)"
    )
    check.add_argument(
        "--data",
        default="{}",
        help='a JSON object of variables for every template, such as \'{"name": "Ada"}\','
        " or @FILE to read it from a file",
    )
    check.set_defaults(handler=check_templates)


def _sample_data(value: str) -> dict[str, Any]:
    if value.startswith("@"):
        value = Path(value[1:]).read_text(encoding="utf-8")
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError(f"must be a JSON object, not {type(data).__name__}")
    return data


def check_templates(args: argparse.Namespace) -> int:
    try:
        data = _sample_data(args.data)
    except (OSError, ValueError) as exc:
        return _usage_error(f"--data: {exc}")
    try:
        directory = args.dir if args.dir is not None else load_settings().templates_dir
    except SettingsError as exc:
        return _usage_error(str(exc))
    if not directory.is_dir():
        return _usage_error(f"{directory}: no such directory")
    templates = Templates(directory)
    problems = templates.check(data)
    for problem in problems:
        print(problem)
    count = len(templates.names())
    print(f"{count} templates in {directory}, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


def _usage_error(message: str) -> int:
    print(f"notifier templates check: {message}", file=sys.stderr)
    return 2
