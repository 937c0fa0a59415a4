"""``notifier serve`` refusing to start: exit 2 for configuration, 1 for a part that cannot
start, always one line per problem and never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme

from tests.support.server import ServerProcess


def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifier", "serve"],
        env=ServerProcess(tmp_path, **env).env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_refused(result: subprocess.CompletedProcess[str], *variables: str) -> None:
    """Exit 2, one ``notifier: NOTIFIER_...`` line per problem, in the order given."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(":", 2)[1].strip() for line in lines] == list(variables), result.stderr
    assert all(line.startswith("notifier: NOTIFIER_") for line in lines)


def cert_only(tmp_path: Path) -> str:
    cert = tmp_path / "server.pem"
    trustme.CA().issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(cert)
    return str(cert)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"NOTIFIER_SMS_PROVIDER": "twilio"}, "NOTIFIER_SMS_ACCOUNT"),
        ({"NOTIFIER_SMS_PROVIDER": "webhook"}, "NOTIFIER_SMS_URL"),
        ({"NOTIFIER_DATABASE_URL": "mysql://db/notifier"}, "NOTIFIER_DATABASE_URL"),
        ({"NOTIFIER_DATABASE_URL": "sqlite://"}, "NOTIFIER_DATABASE_URL"),
        ({"NOTIFIER_TEMPLATES_DIR": __file__}, "NOTIFIER_TEMPLATES_DIR"),
        ({"NOTIFIER_RETRY_MAX_ATTEMPTS": "many"}, "NOTIFIER_RETRY_MAX_ATTEMPTS"),
        ({"NOTIFIER_LOG_LEVEL": "loud"}, "NOTIFIER_LOG_LEVEL"),
    ],
    ids=[
        "twilio-account",
        "webhook-url",
        "mysql",
        "sqlite-no-file",
        "templates-file",
        "not-a-number",
        "log-level",
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(
    tmp_path: Path, env: dict[str, str], variable: str
) -> None:
    assert_refused(serve(tmp_path, **env), variable)
    assert not (tmp_path / "notifier.db").exists(), "the store was opened before the check"


def test_tls_cert_without_key_exits_2_instead_of_serving_plain_tcp(tmp_path: Path) -> None:
    assert_refused(serve(tmp_path, NOTIFIER_TLS_CERT=cert_only(tmp_path)), "NOTIFIER_TLS_KEY")


def test_several_settings_wrong_are_named_together(tmp_path: Path) -> None:
    result = serve(
        tmp_path,
        NOTIFIER_DATABASE_URL="mysql://db/notifier",
        NOTIFIER_TEMPLATES_DIR=__file__,
    )
    assert_refused(result, "NOTIFIER_DATABASE_URL", "NOTIFIER_TEMPLATES_DIR")


def test_several_channels_refused_are_named_together(tmp_path: Path) -> None:
    result = serve(
        tmp_path,
        NOTIFIER_SMTP_HOST="127.0.0.1",
        NOTIFIER_SMTP_FROM="not an address",
        NOTIFIER_SMS_PROVIDER="ihuyi",
    )
    assert_refused(result, "NOTIFIER_SMTP_FROM", "NOTIFIER_SMS_ACCOUNT")


@contextmanager
def listening() -> Iterator[str]:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield str(other.getsockname()[1])


@pytest.mark.parametrize("variable", ["NOTIFIER_PORT", "NOTIFIER_HTTP_PORT"])
def test_port_in_use_exits_1_with_one_line(tmp_path: Path, variable: str) -> None:
    with listening() as port:
        result = serve(tmp_path, **{variable: port})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    refusal = [line for line in result.stderr.splitlines() if line.startswith("notifier:")]
    assert len(refusal) == 1 and "cannot start" in refusal[0] and port in refusal[0]
