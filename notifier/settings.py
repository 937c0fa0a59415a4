"""All configuration, from ``NOTIFIER_*`` environment variables or a ``.env`` file.

The names are part of the contract (PROTOCOL.md, Settings). Secrets are ``SecretStr`` so
that no repr, log line or error message can show them.
"""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from notifier.bounces.mailbox import MailboxConfig, parse_mailbox_url
from notifier.store import BACKENDS, backend_for

ENV_PREFIX = "NOTIFIER_"

SMSProviderName = Literal["ihuyi", "twilio", "webhook"]


class SettingsError(Exception):
    """Settings have bad values; each problem names its variable and what would be right."""

    def __init__(self, *problems: str) -> None:
        super().__init__(*problems)
        self.problems = problems

    def __str__(self) -> str:
        return "; ".join(self.problems)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise ValueError("has a port out of range") from None
    return value


#: A URL kept as the text given (pydantic's HttpUrl would normalise it, e.g. add a slash).
HttpUrlText = Annotated[str, AfterValidator(_http_url)]

_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_LIMIT = re.compile(r"^(\d+)/(\d*)([smhd])$")


@dataclass(frozen=True, slots=True)
class RecipientLimit:
    """At most ``count`` sends to one number in any window of ``seconds``."""

    count: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds:g}s"


def parse_recipient_limits(value: str) -> tuple[RecipientLimit, ...]:
    """``"1/1s,5/1h"``: N per window, windows in s, m, h or d."""
    limits = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        match = _LIMIT.match(part)
        if match is None or int(match[1]) < 1:
            raise ValueError(f"{part!r} is not N/window such as 1/1s, 5/1h or 20/1d")
        length = int(match[2] or 1) * _WINDOW_UNITS[match[3]]
        limits.append(RecipientLimit(int(match[1]), float(length)))
    return tuple(limits)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True
    )

    # Listener
    host: str = "127.0.0.1"
    port: int = Field(7725, ge=0, le=65535)
    http_port: int = Field(7726, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    max_line_bytes: int = Field(1024 * 1024, ge=256)
    max_connections: int = Field(1000, ge=1)
    idle_timeout: float = Field(300.0, gt=0)
    max_pipeline: int = Field(1000, ge=1)
    rate_limit: float = Field(0.0, ge=0)
    rate_burst: int = Field(100, ge=1)
    #: Admin ops that requeue or delete (retry, purge, unsuppress) per token: that many at
    #: once, refilled over the window (``30/1m``); ``0`` is off.
    admin_rate_limit: Annotated[RecipientLimit | None, NoDecode] = RecipientLimit(30, 60.0)
    shutdown_grace: float = Field(10.0, ge=0)

    # Store
    #: Not in ``repr``: a PostgreSQL URL may carry a password.
    database_url: str = Field("sqlite:///./notifier.db", repr=False)
    retention_days: float = Field(30.0, gt=0)
    database_pool_size: int = Field(10, ge=2)
    database_statement_timeout: float = Field(10.0, gt=0)
    database_pgbouncer: bool = False
    heartbeat_interval: float = Field(1.0, gt=0)
    instance_dead_after: float = Field(3.0, gt=0)

    # Delivery
    retry_max_attempts: int = Field(8, ge=1)
    retry_base_delay: float = Field(2.0, ge=0)
    retry_max_delay: float = Field(600.0, ge=0)
    delivery_timeout: float = Field(60.0, gt=0)
    lease_seconds: float = Field(120.0, gt=0)
    poll_interval: float = Field(1.0, gt=0)
    email_concurrency: int = Field(32, ge=1)
    sms_concurrency: int = Field(32, ge=1)

    # Templates and outbox
    templates_dir: Path = Path("./templates")
    outbox_dir: Path = Path("./outbox")

    # Email
    smtp_host: str | None = None
    smtp_port: int = Field(465, ge=1, le=65535)
    smtp_security: Literal["ssl", "starttls", "none"] = "ssl"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "notifier@localhost"
    smtp_ca_file: Path | None = None
    smtp_timeout: float = Field(30.0, gt=0)
    smtp_pool_size: int = Field(32, ge=1)
    smtp_max_recipients: int = Field(100, ge=1)
    smtp_fallback_host: str | None = None
    smtp_fallback_port: int | None = Field(None, ge=1, le=65535)
    smtp_fallback_security: Literal["ssl", "starttls", "none"] | None = None
    smtp_fallback_username: str | None = None
    smtp_fallback_password: SecretStr | None = None

    # SMS: one provider or several, tried in order (comma-separated); the unprefixed
    # settings are the first provider's, NOTIFIER_SMS_<NAME>_* any provider's own.
    sms_provider: Annotated[tuple[SMSProviderName, ...], NoDecode] = ()
    sms_url: str | None = None
    sms_account: str | None = None
    sms_api_key: SecretStr | None = None
    sms_from: str | None = None
    sms_ihuyi_url: str | None = None
    sms_ihuyi_account: str | None = None
    sms_ihuyi_api_key: SecretStr | None = None
    sms_ihuyi_from: str | None = None
    sms_twilio_url: str | None = None
    sms_twilio_account: str | None = None
    sms_twilio_api_key: SecretStr | None = None
    sms_twilio_from: str | None = None
    sms_webhook_url: str | None = None
    sms_webhook_account: str | None = None
    sms_webhook_api_key: SecretStr | None = None
    sms_webhook_from: str | None = None
    sms_timeout: float = Field(15.0, gt=0)
    circuit_failures: int = Field(5, ge=1)
    circuit_open_seconds: float = Field(30.0, gt=0)

    # Callbacks (job events POSTed to the app)
    callback_url: HttpUrlText | None = None
    callback_secret: SecretStr | None = None
    callback_max_attempts: int = Field(10, ge=1)
    callback_timeout: float = Field(10.0, gt=0)
    callback_concurrency: int = Field(8, ge=1)

    # Traffic control
    #: The share of each claim that goes to the longest-waiting due jobs whatever their
    #: priority, so a stream of high work never starves low work (0 = strict priority).
    priority_aging_share: float = Field(0.125, ge=0, le=1)
    sms_recipient_limits: Annotated[tuple[RecipientLimit, ...], NoDecode] = ()

    # Logs
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    # Receipts: delivery reports pushed by SMS providers (notifier/receipts.py)
    receipts_port: int = Field(0, ge=0, le=65535)
    receipts_public_url: str | None = None
    receipts_max_body_bytes: int = Field(64 * 1024, ge=1024)
    receipts_rate_limit: float = Field(50.0, ge=0)
    receipts_rate_burst: int = Field(200, ge=1)

    @field_validator("receipts_public_url", mode="before")
    @classmethod
    def _public_url(cls, value: object) -> object:
        if value == "" or value is None:
            return None
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, as the providers see it")
        return value.rstrip("/")

    @field_validator("sms_recipient_limits", mode="before")
    @classmethod
    def _parse_limits(cls, value: object) -> object:
        return parse_recipient_limits(value) if isinstance(value, str) else value

    @field_validator("admin_rate_limit", mode="before")
    @classmethod
    def _parse_admin_limit(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if value.strip() in ("", "0"):
            return None
        limits = parse_recipient_limits(value)
        if len(limits) != 1:
            raise ValueError(f"{value!r} is not one N/window such as 30/1m, nor 0 for off")
        return limits[0]

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(SecretStr(t.strip()) for t in value.split(",") if t.strip())
        return value

    @field_validator("sms_provider", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            names = tuple(name.strip() for name in value.split(",") if name.strip())
            if len(set(names)) != len(names):
                raise ValueError(f"a provider is named twice in {value!r}")
            return names
        return value

    @field_validator(
        "tls_cert",
        "tls_key",
        "smtp_host",
        "smtp_ca_file",
        "sms_url",
        "smtp_username",
        "smtp_password",
        "smtp_fallback_host",
        "smtp_fallback_port",
        "smtp_fallback_security",
        "smtp_fallback_username",
        "smtp_fallback_password",
        "sms_account",
        "sms_api_key",
        "sms_from",
        "sms_ihuyi_url",
        "sms_ihuyi_account",
        "sms_ihuyi_api_key",
        "sms_ihuyi_from",
        "sms_twilio_url",
        "sms_twilio_account",
        "sms_twilio_api_key",
        "sms_twilio_from",
        "sms_webhook_url",
        "sms_webhook_account",
        "sms_webhook_api_key",
        "sms_webhook_from",
        "callback_url",
        "callback_secret",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if not backend_for(value):
            known = ", ".join(f"{scheme}://" for scheme in sorted(BACKENDS))
            raise ValueError(f"no store serves this URL; it should start with one of {known}")
        return value

    @field_validator("templates_dir", "outbox_dir")
    @classmethod
    def _directory(cls, value: Path) -> Path:
        """Missing is fine (empty, or made on first use); a file in the way is a mistake."""
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} is not a directory; name a directory (or a new path)")
        return value

    @field_validator("smtp_ca_file", "tls_cert", "tls_key")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file; name an existing PEM file")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        levels = logging.getLevelNamesMapping()
        if value.upper() not in levels:
            raise ValueError(f"unknown level {value!r}; use one of {', '.join(levels)}")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        """Half a TLS pair must not quietly serve plain TCP; a pair must load."""
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("CERT", "KEY") if self.tls_key is None else ("KEY", "CERT")
            raise ValueError(
                f"NOTIFIER_TLS_{missing}: required with NOTIFIER_TLS_{given}"
                " (set both to serve TLS, or neither for plain TCP)"
            )
        try:
            self.tls_context()
        except OSError as exc:
            reason = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
            raise ValueError(
                "NOTIFIER_TLS_CERT, NOTIFIER_TLS_KEY: do not load as a certificate chain and"
                f" its private key ({reason}); give PEM files that belong together"
            ) from None
        return self

    @model_validator(mode="after")
    def _liveness(self) -> Self:
        """A live instance must beat at least twice within the time that declares it dead,
        or a single late heartbeat hands its deliveries to another instance (sent twice)."""
        if self.instance_dead_after < 2 * self.heartbeat_interval:
            raise ValueError(
                f"NOTIFIER_INSTANCE_DEAD_AFTER ({self.instance_dead_after:g}) must be at least"
                f" twice NOTIFIER_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g})"
            )
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        if self.http_port and self.http_port == self.port:
            raise ValueError(
                f"NOTIFIER_HTTP_PORT: {self.http_port} is NOTIFIER_PORT too; pick another"
                " port, or 0 for any free one"
            )
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    def tls_context(self) -> ssl.SSLContext | None:
        """The listener's TLS context, or None for plain TCP.

        TLS 1.2 at least, stated here rather than left to the defaults of whichever Python
        runs the service (RFC 8996 retired TLS 1.0 and 1.1).
        """
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def concurrency_for(self, channel: str) -> int:
        return {"email": self.email_concurrency, "sms": self.sms_concurrency}.get(channel, 8)

    # Bounces
    bounce_mailbox: SecretStr | None = None
    bounce_poll_interval: float = Field(60.0, gt=0)
    bounce_ca_file: Path | None = None

    @field_validator("bounce_mailbox", "bounce_ca_file", mode="before")
    @classmethod
    def _bounce_empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("bounce_mailbox")
    @classmethod
    def _check_bounce_mailbox(cls, value: SecretStr | None) -> SecretStr | None:
        """Raises ``SettingsError`` itself: pydantic's error would quote the URL and password."""
        if value is not None:
            try:
                parse_mailbox_url(value.get_secret_value())
            except ValueError as exc:
                raise SettingsError(f"bad setting: {ENV_PREFIX}BOUNCE_MAILBOX: {exc}") from None
        return value

    def bounce_mailbox_config(self) -> MailboxConfig | None:
        """The typed mailbox the bounce reader polls; ``None`` when bounces are off."""
        if self.bounce_mailbox is None:
            return None
        return parse_mailbox_url(
            self.bounce_mailbox.get_secret_value(), ca_file=self.bounce_ca_file
        )


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's report into one naming each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(*(_describe(error) for error in exc.errors())) from None


def _describe(error: ErrorDetails) -> str:
    """``NOTIFIER_NAME: what is wrong``; a rule across settings names them itself."""
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    if not error["loc"]:
        return message
    return ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper() + ": " + message
