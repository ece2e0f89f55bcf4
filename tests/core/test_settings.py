"""Settings fail closed: outside development a real key-encryption key is required."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from healthspace.core.errors import ConfigurationError
from healthspace.core.settings import Environment, Settings


def test_settings_read_the_healthspace_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HEALTHSPACE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HEALTHSPACE_ENV", "prod")
    s = Settings()
    assert (s.data_dir, s.env) == (tmp_path, Environment.PROD)


def test_the_default_database_is_a_sqlite_file_in_the_data_directory(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).database_url_for("authority") == f"sqlite:///{tmp_path}/authority.db"


@pytest.mark.parametrize("env", [Environment.PROD, Environment.TEST])
def test_a_missing_kek_outside_dev_is_a_configuration_error(tmp_path: Path, env: Environment) -> None:
    with pytest.raises(ConfigurationError, match="HEALTHSPACE_KEK is not set"):
        Settings(env=env, data_dir=tmp_path).key_encryption_key()
    assert not (tmp_path / "dev.kek").exists()


@pytest.mark.parametrize("kek", ["changeme", "secret", "short"])
def test_a_placeholder_or_short_kek_is_refused(tmp_path: Path, kek: str) -> None:
    with pytest.raises(ConfigurationError, match="placeholder or shorter"):
        Settings(env=Environment.PROD, data_dir=tmp_path, kek=SecretStr(kek)).key_encryption_key()


def test_dev_creates_one_private_kek_and_keeps_it(tmp_path: Path) -> None:
    first = Settings(data_dir=tmp_path).key_encryption_key()
    assert len(first) >= 32
    assert (tmp_path / "dev.kek").stat().st_mode & 0o077 == 0
    assert Settings(data_dir=tmp_path).key_encryption_key() == first
