"""`healthspace study run`: sites from the researcher's STARTED transfers, a table or JSON out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import FastAPI, Header, HTTPException
from typer.testing import CliRunner

from healthspace.cli.study import study_app
from tests.dataplane.provider import SCENARIO, Provider
from tests.support.servers import serve

SPEC = {
    "version": 1,
    "cohort": {
        "inclusion": [
            {"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}
        ]
    },
    "analyses": [{"type": "count", "id": "n"}],
}


def university(providers: dict[str, Provider]) -> FastAPI:
    """The management API of a consumer connector, as far as the CLI reads it."""
    transfers: list[dict[str, Any]] = []
    for p in providers.values():
        p.add_agreement("agr-cli")
        transfers.append(
            {
                "id": f"c-{p.site}",
                "role": "consumer",
                "state": "STARTED",
                "counterparty_id": p.id,
                "agreement_id": "agr-cli",
                "data_address": {
                    "endpoint": f"{p.url}/dataplane",
                    "endpointProperties": [{"name": "authorization", "value": p.token("agr-cli")}],
                },
            }
        )
    transfers.append({"id": "c-old", "role": "consumer", "state": "TERMINATED", "data_address": None})
    app = FastAPI()

    @app.get("/management/transfers")
    def list_transfers(x_api_key: Annotated[str, Header()]) -> list[dict[str, Any]]:
        if x_api_key != "researcher-key":
            raise HTTPException(401)
        return transfers

    return app


@pytest.fixture(scope="module")
def space_file(providers: dict[str, Provider], tmp_path_factory: pytest.TempPathFactory) -> Any:
    with serve(university(providers)) as url:
        path = tmp_path_factory.mktemp("cli") / "space.json"
        path.write_text(
            json.dumps(
                {
                    "participants": [
                        {"id": "hk-university", "url": url, "api_keys": {"researcher": "researcher-key"}}
                    ]
                }
            )
        )
        yield path


def invoke(space: Path, tmp: Path, *extra: str) -> Any:
    spec = tmp / "spec.json"
    spec.write_text(json.dumps(SPEC))
    args = ["run", str(spec), "--scenario", SCENARIO, "--space", str(space), "--as", "hk-university", *extra]
    return CliRunner().invoke(study_app, args)


def test_study_run_json_combines_every_started_transfer(
    space_file: Path, tmp_path: Path, providers: dict[str, Provider]
) -> None:
    result = invoke(space_file, tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    truth = sum(len(p.with_condition("E11") & p.consenting_ids()) for p in providers.values())
    assert sorted(s["site"] for s in doc["sites"]) == sorted(p.id for p in providers.values())
    assert doc["combined"]["n"]["count"] == truth


def test_study_run_prints_a_table(space_file: Path, tmp_path: Path) -> None:
    result = invoke(space_file, tmp_path)
    assert result.exit_code == 0, result.output
    assert "gz-hospital" in result.output
    assert "ok" in result.output


def test_unknown_participant_is_a_clear_error(space_file: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    result = CliRunner().invoke(
        study_app, ["run", str(spec), "--scenario", SCENARIO, "--space", str(space_file), "--as", "nobody"]
    )
    assert result.exit_code == 1
    assert "not a participant" in result.output
