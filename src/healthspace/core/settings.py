"""Settings, declared once: every field described, read from `HEALTHSPACE_*` variables, failing closed."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from healthspace.core.errors import ConfigurationError

__all__ = ["Environment", "Settings"]

# Values that show a secret was copied from an example rather than chosen.
_PLACEHOLDERS = frozenset({"", "changeme", "change-me", "secret", "password", "dev", "test", "example"})


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PROD = "prod"


class Settings(BaseSettings):
    """Process settings. One service process (authority or connector) reads one `Settings`."""

    model_config = SettingsConfigDict(env_prefix="HEALTHSPACE_", extra="ignore")

    env: Environment = Field(
        Environment.DEV,
        description="dev allows a generated key-encryption key kept in the data directory; prod refuses it.",
    )
    data_dir: Path = Field(Path(".healthspace"), description="Where a service keeps its files and SQLite DB.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the control-plane database; default: SQLite file in data_dir.",
    )
    kek: SecretStr | None = Field(
        None,
        description="Key-encryption key protecting private keys at rest (at least 16 characters).",
    )
    log_level: str = Field("INFO", description="Python logging level of the service.")
    audit_head_interval_s: float = Field(
        10.0, gt=0, description="Seconds between signed audit tree heads while a service runs."
    )
    revocation_max_age_s: float = Field(
        5.0, ge=0, description="Seconds a connector trusts a fetched revocation list before fetching anew."
    )

    def database_url_for(self, name: str) -> str:
        """The control-plane database URL; `name` names the SQLite file when no URL is set."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / f'{name}.db').as_posix()}"

    def key_encryption_key(self) -> bytes:
        """The KEK as bytes. Outside dev a missing or placeholder KEK is a configuration error.

        In dev (the default, used by `healthspace demo`) a random KEK is created once and kept in
        `<data_dir>/dev.kek` with owner-only permissions, so a newcomer needs no set-up.
        """
        if self.kek is not None:
            value = self.kek.get_secret_value()
            if value.lower() in _PLACEHOLDERS or len(value) < 16:
                raise ConfigurationError(
                    "HEALTHSPACE_KEK is a placeholder or shorter than 16 characters; choose a real secret"
                )
            return value.encode()
        if self.env is not Environment.DEV:
            raise ConfigurationError(
                f"HEALTHSPACE_KEK is not set; it is required when HEALTHSPACE_ENV={self.env.value} "
                "(private keys are stored encrypted with it)"
            )
        path = self.data_dir / "dev.kek"
        if not path.exists():
            import secrets

            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip().encode()
