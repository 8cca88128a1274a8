"""Settings: ``HELPDESK_*`` environment variables, optionally over a TOML file.

Precedence, highest first: explicit keyword overrides (used by tests and the demo), the
environment, the TOML file named by ``--config``, then the defaults below. The names of the
environment variables are a contract that other tools rely on: rename none of them.

Invariants: nothing here opens a connection or reads a file at import time; every invalid
value is reported as one line naming the variable (``ConfigError``).
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from helpdesk.errors import ConfigError

Security = Literal["ssl", "starttls", "none"]

ENV_PREFIX = "HELPDESK_"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./helpdesk.db"


def is_loopback(host: str) -> bool:
    """True for names and addresses that never leave this machine."""
    if host.lower() in {"localhost", "localhost.localdomain", "ip6-localhost"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class MailboxConfig(BaseModel):
    """One more support mailbox (``HELPDESK_MAILBOXES``, a JSON list, or ``[[mailboxes]]`` in
    the TOML file). Unset fields inherit the top-level ``imap_*`` settings."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    imap_host: str = ""
    imap_port: int | None = Field(default=None, ge=1, le=65535)
    imap_user: str = ""
    imap_password: SecretStr = SecretStr("")
    imap_security: Security | None = None
    imap_auth: Literal["password", "xoauth2"] | None = None
    imap_folder: str = "INBOX"
    imap_processed_folder: str = ""
    support_address: str = ""
    support_name: str = ""


class Settings(BaseSettings):
    """Every setting of helpdesk. Field ``foo`` is read from ``HELPDESK_FOO``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
    )

    database_url: str = DEFAULT_DATABASE_URL
    database_pool_size: int = Field(default=5, ge=1, le=100)

    mailbox_name: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    imap_host: str = ""
    imap_port: int | None = Field(default=None, ge=1, le=65535)
    imap_user: str = ""
    imap_password: SecretStr = SecretStr("")
    imap_security: Security = "ssl"
    imap_folder: str = "INBOX"
    imap_processed_folder: str = ""
    imap_batch_size: int = Field(default=50, ge=1, le=1000)
    imap_poll_interval: float = Field(default=30.0, gt=0)
    imap_timeout: float = Field(default=30.0, gt=0)
    crisis_scout: bool = True
    """Watch new mail on a second IMAP connection so a crisis never waits behind a backlog."""

    smtp_host: str = ""
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_user: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_security: Security = "ssl"
    smtp_timeout: float = Field(default=30.0, gt=0)
    smtp_connections: int = Field(default=2, ge=1, le=10)
    """Connections the routine outbox delivers over at once (still at most one mail handed
    over and not yet recorded at any moment)."""

    imap_auth: Literal["password", "xoauth2"] = "password"
    smtp_auth: Literal["password", "xoauth2"] = "password"
    oauth_token_command: str = ""
    """A command printing an OAuth2 access token (bare, or JSON with expires_in)."""
    oauth_token_file: str = ""
    """A file holding the access token, kept fresh by something else."""

    mailboxes: list[MailboxConfig] = Field(default_factory=list)
    """Further mailboxes watched beside the main one, each with its own cursor and lease."""

    allow_insecure: bool = False
    """Allow ``*_security=none`` to a host that is not on this machine (plain-text passwords)."""

    support_address: str = "help@example.org"
    support_name: str = "Patient Support"
    message_id_domain: str = ""
    ack_subject: str = "We received your message [{reference}]"
    ack_limit_per_sender: int = Field(default=3, ge=0)
    ack_limit_window_hours: float = Field(default=24.0, gt=0)
    reply_window: str = "5–7 days"
    due_days: int = Field(default=7, ge=1)

    base_url: str = "http://127.0.0.1:8000"
    secret_key: SecretStr = SecretStr("")

    outbox_retry_base_seconds: float = Field(default=30.0, ge=0)
    outbox_retry_max_seconds: float = Field(default=1800.0, ge=0)
    outbox_deadline_hours: float = Field(default=48.0, gt=0)
    outbox_batch_size: int = Field(default=100, ge=1)

    escalation_level_delays: list[int] = Field(default_factory=lambda: [0, 300, 600])
    """Seconds before each escalation level is paged, after the previous one."""
    escalation_repeats: int = Field(default=3, ge=1)
    escalation_webhook_url: str = ""
    escalation_token_hours: float = Field(default=24.0, gt=0)

    worker_id: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "text"
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """auto: uvloop when it is installed (it is a dependency on Linux and macOS)."""

    @property
    def imap_port_effective(self) -> int:
        if self.imap_port:
            return self.imap_port
        return 993 if self.imap_security == "ssl" else 143

    @property
    def smtp_port_effective(self) -> int:
        if self.smtp_port:
            return self.smtp_port
        return {"ssl": 465, "starttls": 587, "none": 25}[self.smtp_security]

    @property
    def message_id_domain_effective(self) -> str:
        if self.message_id_domain:
            return self.message_id_domain
        return self.support_address.rpartition("@")[2] or "helpdesk.invalid"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def mailbox_settings(self) -> list[Settings]:
        """One Settings per watched mailbox: the main one (named "default", when
        ``imap_host`` is set) and each of ``mailboxes`` with the top level as defaults."""
        result = [self] if self.imap_host else []
        for box in self.mailboxes:
            values = {k: v for k, v in box.model_dump().items() if v not in ("", None)}
            values.pop("name")
            values["mailbox_name"] = box.name
            result.append(self.model_copy(update=values))
        return result

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        names = [self.mailbox_name, *(b.name for b in self.mailboxes)]
        if len(set(names)) != len(names):
            raise ValueError(f"{ENV_PREFIX}MAILBOXES: every mailbox needs its own name")
        for proto, host, security in (
            ("imap", self.imap_host, self.imap_security),
            ("smtp", self.smtp_host, self.smtp_security),
            *(("imap", b.imap_host, b.imap_security or self.imap_security) for b in self.mailboxes),
        ):
            if host and security == "none" and not is_loopback(host) and not self.allow_insecure:
                raise ValueError(
                    f"{ENV_PREFIX}{proto.upper()}_SECURITY=none sends passwords in clear text to"
                    f" {host}; use ssl or starttls, or set {ENV_PREFIX}ALLOW_INSECURE=true"
                )
        if "@" not in self.support_address or any(c in self.support_address for c in "\r\n <>"):
            raise ValueError(
                f"{ENV_PREFIX}SUPPORT_ADDRESS must be a plain address like help@example.org,"
                f" not {self.support_address!r}"
            )
        if not self.database_url.split(":", 1)[0].startswith(("sqlite", "postgresql")):
            raise ValueError(
                f"{ENV_PREFIX}DATABASE_URL must start with sqlite+aiosqlite:// or"
                " postgresql+asyncpg://"
            )
        if "xoauth2" in (self.imap_auth, self.smtp_auth) and (
            bool(self.oauth_token_command) == bool(self.oauth_token_file)
        ):
            raise ValueError(
                f"XOAUTH2 login needs exactly one of {ENV_PREFIX}OAUTH_TOKEN_COMMAND or"
                f" {ENV_PREFIX}OAUTH_TOKEN_FILE"
            )
        if not self.escalation_level_delays or any(d < 0 for d in self.escalation_level_delays):
            raise ValueError(
                f"{ENV_PREFIX}ESCALATION_LEVEL_DELAYS must be a non-empty JSON list of"
                " seconds >= 0, e.g. [0, 300, 600]"
            )
        return self

    @property
    def async_database_url(self) -> str:
        """The URL with an async driver: plain ``postgresql://`` becomes asyncpg."""
        url = self.database_url
        for plain in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
            if url.startswith(plain):
                return "postgresql+asyncpg://" + url[len(plain) :]
        if url.startswith("sqlite://"):
            return "sqlite+aiosqlite://" + url[len("sqlite://") :]
        return url


class _TomlSource(PydanticBaseSettingsSource):
    """Reads a flat TOML table whose keys are the field names (``imap_host = "…"``)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    table = data.get("helpdesk", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [helpdesk] must be a table")
    unknown = sorted(set(table) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s): {', '.join(unknown)}")
    return dict(table)


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p != "__root__"]
        name = f"{ENV_PREFIX}{loc[0].upper()}" if loc else "settings"
        msg = err["msg"].removeprefix("Value error, ")
        if loc and "input" in err and not isinstance(err["input"], dict):
            shown = "***" if "password" in loc[0] or "secret" in loc[0] else err["input"]
            lines.append(f"{name}: {msg} (got {shown!r})")
        else:
            lines.append(msg if not loc else f"{name}: {msg}")
    return "\n".join(lines)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings, or raise ``ConfigError`` with one line per bad value."""
    file_data = _read_toml(Path(config_file)) if config_file else {}

    class _Loaded(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _TomlSource(settings_cls, file_data))

    try:
        loaded = _Loaded(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    return loaded
