"""All configuration, from ``NOTIFIER_*`` environment variables or a ``.env`` file.

The names are part of the contract (PROTOCOL.md, Settings). Secrets are ``SecretStr`` so
that no repr, log line or error message can show them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "NOTIFIER_"


class SettingsError(Exception):
    """A setting has a bad value; the message names the variable."""


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
    shutdown_grace: float = Field(10.0, ge=0)

    # Store
    database_url: str = "sqlite:///./notifier.db"
    retention_days: float = Field(30.0, gt=0)
    database_pool_size: int = Field(10, ge=2)
    database_statement_timeout: float = Field(10.0, gt=0)
    database_pgbouncer: bool = False
    heartbeat_interval: float = Field(2.0, gt=0)
    instance_dead_after: float = Field(10.0, gt=0)

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

    # SMS
    sms_provider: Literal["ihuyi", "twilio", "webhook"] | None = None
    sms_url: str | None = None
    sms_account: str | None = None
    sms_api_key: SecretStr | None = None
    sms_from: str | None = None
    sms_timeout: float = Field(15.0, gt=0)
    circuit_failures: int = Field(5, ge=1)
    circuit_open_seconds: float = Field(30.0, gt=0)

    # Logs
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(SecretStr(t.strip()) for t in value.split(",") if t.strip())
        return value

    @field_validator(
        "tls_cert",
        "tls_key",
        "smtp_host",
        "smtp_ca_file",
        "sms_provider",
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
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    def concurrency_for(self, channel: str) -> int:
        return {"email": self.email_concurrency, "sms": self.sms_concurrency}.get(channel, 8)


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's report into one naming each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper()
            problems.append(f"{name}: {error['msg']}")
        raise SettingsError("bad setting: " + "; ".join(problems)) from None
