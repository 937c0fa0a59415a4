"""Settings refuse what cannot work, naming each variable and what would be right."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from notifier.settings import Settings, SettingsError, load_settings


def refusal(**values: Any) -> str:
    with pytest.raises(SettingsError) as refused:
        load_settings(_env_file=None, **values)
    return str(refused.value)


def tls_pair(folder: Path, name: str = "server") -> tuple[Path, Path]:
    issued = trustme.CA().issue_cert("127.0.0.1")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    return cert, key


def test_defaults_are_accepted() -> None:
    settings = load_settings(_env_file=None)
    assert isinstance(settings, Settings) and settings.tls_context() is None


def test_tls_cert_without_key_is_refused_not_served_as_plain_tcp(tmp_path: Path) -> None:
    cert, _ = tls_pair(tmp_path)
    message = refusal(tls_cert=cert)
    assert message.startswith("NOTIFIER_TLS_KEY: required with NOTIFIER_TLS_CERT")


def test_tls_key_without_cert_is_refused(tmp_path: Path) -> None:
    _, key = tls_pair(tmp_path)
    assert refusal(tls_key=key).startswith("NOTIFIER_TLS_CERT: required with NOTIFIER_TLS_KEY")


def test_tls_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    _, key = tls_pair(tmp_path)
    message = refusal(tls_cert=tmp_path / "missing.pem", tls_key=key)
    assert message.startswith("NOTIFIER_TLS_CERT: ") and "missing.pem is not a file" in message


def test_tls_pair_that_does_not_belong_together_is_refused(tmp_path: Path) -> None:
    cert, _ = tls_pair(tmp_path, "one")
    _, other_key = tls_pair(tmp_path, "other")
    message = refusal(tls_cert=cert, tls_key=other_key)
    assert message.startswith("NOTIFIER_TLS_CERT, NOTIFIER_TLS_KEY: do not load")
    assert "PRIVATE KEY" not in message


def test_tls_pair_loads(tmp_path: Path) -> None:
    cert, key = tls_pair(tmp_path)
    settings = load_settings(_env_file=None, tls_cert=cert, tls_key=key)
    context = settings.tls_context()
    assert settings.tls_enabled and context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize("url", ["mysql://db/notifier", "notifier.db", "sqlite3:///x.db"])
def test_database_url_no_store_serves_is_refused(url: str) -> None:
    message = refusal(database_url=url)
    assert message.startswith("NOTIFIER_DATABASE_URL: no store serves this URL")
    assert "sqlite://" in message and "postgresql://" in message


@pytest.mark.parametrize("url", ["sqlite:///./x.db", "postgresql://h/db", "postgresql+x://h/db"])
def test_database_url_a_store_serves_is_accepted(url: str) -> None:
    assert load_settings(_env_file=None, database_url=url).database_url == url


@pytest.mark.parametrize("field", ["templates_dir", "outbox_dir"])
def test_directory_naming_a_file_is_refused(tmp_path: Path, field: str) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    message = refusal(**{field: a_file})
    assert message.startswith(f"NOTIFIER_{field.upper()}: {a_file} is not a directory")


@pytest.mark.parametrize("field", ["templates_dir", "outbox_dir"])
def test_directory_not_made_yet_is_accepted(tmp_path: Path, field: str) -> None:
    assert getattr(load_settings(_env_file=None, **{field: tmp_path / "new"}), field).name == "new"


def test_smtp_ca_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    assert refusal(smtp_ca_file=tmp_path / "ca.pem").startswith("NOTIFIER_SMTP_CA_FILE: ")


def test_unknown_log_level_is_refused() -> None:
    assert refusal(log_level="loud").startswith("NOTIFIER_LOG_LEVEL: unknown level 'loud'")


def test_http_port_equal_to_port_is_refused() -> None:
    assert refusal(port=7000, http_port=7000).startswith(
        "NOTIFIER_HTTP_PORT: 7000 is NOTIFIER_PORT"
    )


def test_several_mistakes_are_named_together(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(
            _env_file=None,
            database_url="mysql://db/notifier",
            retry_max_attempts="many",
            templates_dir=Path(__file__),
        )
    named = [problem.split(":", 1)[0] for problem in refused.value.problems]
    assert named == [
        "NOTIFIER_DATABASE_URL",
        "NOTIFIER_RETRY_MAX_ATTEMPTS",
        "NOTIFIER_TEMPLATES_DIR",
    ]


def test_a_refusal_never_shows_a_secret() -> None:
    message = refusal(sms_api_key="s3cret-key", smtp_password="s3cret-pass", smtp_port="x")
    assert "s3cret" not in message


#: Every secret setting, each with a value no other setting or message could contain.
SECRETS: dict[str, str] = {
    "auth_tokens": "tok-3f9a1c,tok-7b2e44",
    "smtp_password": "smtp-pw-5d1e",
    "smtp_fallback_password": "smtp-fallback-pw-8c0a",
    "sms_api_key": "sms-key-2a6f",
    "sms_ihuyi_api_key": "ihuyi-key-9e3b",
    "sms_twilio_api_key": "twilio-token-4c7d",
    "sms_webhook_api_key": "webhook-key-1f8e",
    "callback_secret": "callback-secret-6b2c",
    "bounce_mailbox": "imaps://bounces%40example.com:mailbox-pw-0d9a@mail.example.com",
}
SECRET_TEXTS = (
    "tok-3f9a1c",
    "tok-7b2e44",
    "mailbox-pw-0d9a",
    *(value for name, value in SECRETS.items() if name not in ("auth_tokens", "bounce_mailbox")),
)


def shown_secrets(text: str) -> list[str]:
    return [secret for secret in SECRET_TEXTS if secret in text]


def test_settings_never_show_a_secret() -> None:
    settings = load_settings(_env_file=None, sms_provider="ihuyi,twilio,webhook", **SECRETS)
    assert settings.smtp_password is not None
    assert settings.smtp_password.get_secret_value() == "smtp-pw-5d1e", "the secret is kept"
    for shown in (repr(settings), str(settings), settings.model_dump_json(), str(vars(settings))):
        assert shown_secrets(shown) == []


def test_a_refusal_next_to_every_secret_shows_none_of_them() -> None:
    assert shown_secrets(refusal(**SECRETS, smtp_port="x", callback_url="ftp://x")) == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://user:mailbox-pw-0d9a@mail.example.com",
        "imaps://user:mailbox-pw-0d9a@mail.example.com/INBOX",
        "imaps://user:mailbox-pw-0d9a@mail.example.com:port",
        "imaps://user:mailbox-pw-0d9a@",
    ],
)
def test_a_bad_mailbox_url_is_refused_without_its_password(url: str) -> None:
    message = refusal(**{**SECRETS, "bounce_mailbox": url})
    assert "NOTIFIER_BOUNCE_MAILBOX" in message and shown_secrets(message) == []


def test_a_database_password_is_not_in_the_repr() -> None:
    settings = Settings(_env_file=None, database_url="postgresql://notifier:hunter2@db/notifier")  # type: ignore[call-arg]
    assert "hunter2" not in repr(settings)


def test_admin_rate_limit_is_on_by_default_and_0_turns_it_off() -> None:
    assert str(load_settings(_env_file=None).admin_rate_limit) == "30/60s"
    assert str(load_settings(_env_file=None, admin_rate_limit="5/1h").admin_rate_limit) == "5/3600s"
    assert load_settings(_env_file=None, admin_rate_limit="0").admin_rate_limit is None


@pytest.mark.parametrize("value", ["often", "1/1s,2/1m", "0/1m"])
def test_admin_rate_limit_that_is_not_one_window_is_refused(value: str) -> None:
    assert refusal(admin_rate_limit=value).startswith("NOTIFIER_ADMIN_RATE_LIMIT: ")
