"""A connector's identity and trust anchor on disk (`connector.json` beside its key and credential)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from healthspace.core.errors import ConfigurationError

__all__ = ["CONFIG_FILE", "CREDENTIAL_FILE", "KEY_FILE", "ConnectorConfig"]

CONFIG_FILE = "connector.json"
KEY_FILE = "participant.key"
CREDENTIAL_FILE = "credential.jwt"


class ConnectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    participant_id: str
    legal_name: str
    participant_type: str
    jurisdiction: str
    roles: list[str] = Field(default_factory=list)
    public_url: str = Field(description="Base URL other participants use to reach this connector")
    authority_url: str
    authority_id: str
    authority_public_key: str = Field(description="Pinned at onboarding; the trust anchor of every check")
    patient_id_prefix: str | None = Field(
        None,
        description="Hospitals: prefix of FHIR Patient ids (e.g. 'gz-pat-'); enables the consent registry",
    )

    @classmethod
    def load(cls, data_dir: Path) -> ConnectorConfig:
        path = data_dir / CONFIG_FILE
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigurationError(
                f"no connector in {data_dir} (missing {CONFIG_FILE}); run `healthspace connector init` first"
            ) from None
        except ValueError as exc:
            raise ConfigurationError(f"{path} is not a valid connector configuration: {exc}") from None

    def save(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / CONFIG_FILE).write_text(self.model_dump_json(indent=2))
