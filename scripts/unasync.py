"""Write the blocking client, ``notifier/client/_sync.py``, from the asyncio one, ``_async.py``.

httpcore's approach: one source of truth, and the blocking twin made from it by substituting
tokens, so that the two can never drift apart and both keep full docstrings. The I/O
primitives that cannot be substituted live in pairs in ``notifier/client/_transports.py``.

    python scripts/unasync.py          # rewrite _sync.py
    python scripts/unasync.py --check  # exit 1 if _sync.py is not what _async.py gives

The output goes through ``ruff format`` (lines that lost an ``await`` may now fit on one).
Every substitution must apply at least once, so the list cannot keep rules that no longer
mean anything.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Source and generated file, relative to the repository root.
FILES = {Path("notifier/client/_async.py"): Path("notifier/client/_sync.py")}

#: In order: phrases of docstrings first, then names, then keywords.
SUBSTITUTIONS = [
    (r"A notifier client for asyncio\.", "A blocking notifier client."),
    (r"\bshared between tasks\b", "shared between threads"),
    (r"\bAwaitable, ", ""),
    (r"\bAwaitable\[(\w+)\]", r"\1"),
    (r"\bAsyncRetrying\b", "Retrying"),
    (r"\bAsyncClient\b", "Client"),
    (r"\bAsyncConnection\b", "SyncConnection"),
    (r"\bAsyncLock\b", "SyncLock"),
    (r"\basync_sleep\b", "sync_sleep"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\baclose\b", "close"),
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\bawait ", ""),
]

HEADER = '''\
# Generated from {source} by scripts/unasync.py: do not edit.
# Edit {source}, then run `python scripts/unasync.py`.
"""The blocking client: one socket (TLS optional), on which requests take turns.

It runs no event loop of its own, so it works anywhere, a running loop's executor threads
included (``await loop.run_in_executor(None, client.send, ...)``).
"""
'''


def unasync(source: str, name: str) -> str:
    """The blocking twin of ``source``: its module docstring replaced, its code substituted."""
    docstring = ast.parse(source).body[0]
    if not isinstance(docstring, ast.Expr) or not isinstance(docstring.value, ast.Constant):
        raise SystemExit(f"{name}: must start with a module docstring")
    code = "".join(source.splitlines(keepends=True)[docstring.end_lineno :])
    for pattern, replacement in SUBSTITUTIONS:
        code, count = re.subn(pattern, replacement, code)
        if count == 0:
            raise SystemExit(f"{name}: the substitution {pattern!r} no longer applies")
    return _formatted(HEADER.format(source=name) + code)


def _formatted(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", "generated.py", "-"],
        input=code,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"ruff format failed on the generated code:\n{result.stderr}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this)")
    args = parser.parse_args(argv)
    stale = []
    for source, target in FILES.items():
        expected = unasync((args.root / source).read_text(encoding="utf-8"), source.as_posix())
        path = args.root / target
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == expected:
            continue
        if args.check:
            stale.append(target)
        else:
            path.write_text(expected, encoding="utf-8")
            print(f"wrote {target}")
    for target in stale:
        print(f"{target} is stale: run python scripts/unasync.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
