"""`healthspace dsp send` and the staff commands, against a live data space on loopback."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

from healthspace.cli.dsp import register
from healthspace.core.apikeys import Role
from healthspace.identity.keys import SigningKey
from healthspace.protocol.messages import CatalogError, CatalogResponse, DatasetResponse, parse_as
from tests.support.space import Space, running_space

GZ, HKU = "gz-hospital", "hk-university"
SCENARIO = "diabetes-outcomes-research"

app = typer.Typer()
register(app)
runner = CliRunner()


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Space]:
    with running_space(tmp_path_factory.mktemp("cli-dsp")) as s:
        yield s


@pytest.fixture(scope="module")
def space_file(space: Space, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The running space described the way `healthspace demo` writes its space.json."""
    doc = {
        "participants": [
            {
                "id": node.id,
                "url": node.url,
                "identity": {
                    "key": str(node.data_dir / "participant.key"),
                    "credential": str(node.data_dir / "credential.jwt"),
                    "kek": str(node.data_dir / "dev.kek"),
                },
                "api_keys": {role.value: key for role, key in node.keys.items()},
            }
            for node in space.connectors.values()
        ]
    }
    path = tmp_path_factory.mktemp("cli-space") / "space.json"
    path.write_text(json.dumps(doc))
    return path


def _write(tmp_path: Path, name: str, doc: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _invoke(*args: str) -> Result:
    return runner.invoke(app, list(args), catch_exceptions=False)


def _json_of(result: Result) -> Any:
    """The JSON body `dsp send` printed after its status and header lines."""
    start = result.stdout.index("{")
    return json.loads(result.stdout[start:])


CATALOG_REQUEST = {
    "@context": ["https://w3id.org/dspace/2025/1/context.jsonld"],
    "@type": "CatalogRequestMessage",
}


def _send(space: Space, space_file: Path, path: str, message: Path, *extra: str) -> Result:
    return _invoke(
        "dsp",
        "send",
        "--space",
        str(space_file),
        "--as",
        HKU,
        "--to",
        space.connectors[GZ].url,
        path,
        str(message),
        *extra,
    )


# --- dsp send ------------------------------------------------------------------------------------------


def test_send_a_catalog_request_answers_200_with_a_catalog(
    space: Space, space_file: Path, tmp_path: Path
) -> None:
    result = _send(space, space_file, "/catalog/request", _write(tmp_path, "m.json", CATALOG_REQUEST))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("HTTP 200")
    catalog = parse_as(_json_of(result), CatalogResponse)
    assert catalog.participant_id == GZ


def test_send_with_an_identity_file_of_relative_paths(space: Space, tmp_path: Path) -> None:
    node = space.connectors[HKU]
    for name in ("participant.key", "credential.jwt", "dev.kek"):
        (tmp_path / name).write_bytes((node.data_dir / name).read_bytes())
    identity = _write(
        tmp_path,
        "id.json",
        {"id": HKU, "key": "participant.key", "credential": "credential.jwt", "kek": "dev.kek"},
    )
    message = _write(tmp_path, "m.json", CATALOG_REQUEST)
    result = _invoke(
        "dsp",
        "send",
        "--identity",
        str(identity),
        "--to",
        space.connectors[GZ].url,
        "/catalog/request",
        str(message),
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("HTTP 200")


def test_an_invalid_message_is_refused_locally_with_the_schema_problem(
    space: Space, space_file: Path, tmp_path: Path
) -> None:
    message = _write(tmp_path, "m.json", {**CATALOG_REQUEST, "filter": "diabetes"})
    result = _send(space, space_file, "/catalog/request", message)
    assert result.exit_code == 1
    assert "refused locally" in result.output
    assert "/filter" in result.output
    assert "HTTP" not in result.stdout  # nothing was sent


def test_without_validation_the_server_answers_400_to_an_invalid_message(
    space: Space, space_file: Path, tmp_path: Path
) -> None:
    message = _write(tmp_path, "m.json", {**CATALOG_REQUEST, "filter": "diabetes"})
    result = _send(space, space_file, "/catalog/request", message, "--no-validate")
    assert result.exit_code == 1
    assert result.stdout.startswith("HTTP 400")
    error = parse_as(_json_of(result), CatalogError)
    assert error.code == "dsp-invalid-message"


def test_a_message_for_another_endpoint_is_refused_locally(
    space: Space, space_file: Path, tmp_path: Path
) -> None:
    result = _send(space, space_file, "/transfers/request", _write(tmp_path, "m.json", CATALOG_REQUEST))
    assert result.exit_code == 1
    assert "takes a TransferRequestMessage" in result.output


def test_a_forged_identity_is_refused_with_401(space: Space, tmp_path: Path) -> None:
    # The real credential with a key it does not bind: the receiver must refuse the signature.
    node = space.connectors[HKU]
    (tmp_path / "kek").write_text("a-forger-kek-of-enough-length")
    SigningKey.generate().save(tmp_path / "forged.key", b"a-forger-kek-of-enough-length")
    identity = _write(
        tmp_path,
        "id.json",
        {"id": HKU, "key": "forged.key", "credential": str(node.data_dir / "credential.jwt"), "kek": "kek"},
    )
    message = _write(tmp_path, "m.json", CATALOG_REQUEST)
    result = _invoke(
        "dsp",
        "send",
        "--identity",
        str(identity),
        "--to",
        space.connectors[GZ].url,
        "/catalog/request",
        str(message),
    )
    assert result.exit_code == 1
    assert result.stdout.startswith("HTTP 401")


def test_a_get_fetches_a_dataset(space: Space, space_file: Path) -> None:
    dataset_id = _publish(space_file)
    result = _invoke(
        "dsp",
        "send",
        "--space",
        str(space_file),
        "--as",
        HKU,
        "--to",
        space.connectors[GZ].url,
        "--get",
        f"/catalog/datasets/{dataset_id}",
    )
    assert result.exit_code == 0, result.output
    assert parse_as(_json_of(result), DatasetResponse).id == dataset_id


def test_a_wrong_kek_is_a_clear_error_without_the_kek(space: Space, tmp_path: Path) -> None:
    node = space.connectors[HKU]
    (tmp_path / "kek").write_text("not-the-right-kek-at-all")
    identity = _write(
        tmp_path,
        "id.json",
        {
            "id": HKU,
            "key": str(node.data_dir / "participant.key"),
            "credential": str(node.data_dir / "credential.jwt"),
            "kek": "kek",
        },
    )
    message = _write(tmp_path, "m.json", CATALOG_REQUEST)
    result = _invoke(
        "dsp", "send", "--identity", str(identity), "--to", node.url, "/catalog/request", str(message)
    )
    assert result.exit_code == 1
    assert "wrong key-encryption key" in result.output
    assert "not-the-right-kek-at-all" not in result.output


def test_a_missing_identity_file_is_a_clear_error(space: Space, tmp_path: Path) -> None:
    message = _write(tmp_path, "m.json", CATALOG_REQUEST)
    missing = tmp_path / "nowhere.json"
    result = _invoke(
        "dsp",
        "send",
        "--identity",
        str(missing),
        "--to",
        space.connectors[GZ].url,
        "/catalog/request",
        str(message),
    )
    assert result.exit_code == 1
    assert f"no identity file at {missing}" in result.output


def test_a_space_file_needs_as(space: Space, space_file: Path, tmp_path: Path) -> None:
    message = _write(tmp_path, "m.json", CATALOG_REQUEST)
    result = _invoke(
        "dsp",
        "send",
        "--space",
        str(space_file),
        "--to",
        space.connectors[GZ].url,
        "/catalog/request",
        str(message),
    )
    assert result.exit_code == 1
    assert "--as" in result.output


def test_an_unreachable_receiver_is_a_clear_error(space_file: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    message = _write(tmp_path, "m.json", CATALOG_REQUEST)
    result = _invoke(
        "dsp",
        "send",
        "--space",
        str(space_file),
        "--as",
        HKU,
        "--to",
        f"http://127.0.0.1:{port}",
        "--audience",
        GZ,
        "/catalog/request",
        str(message),
    )
    assert result.exit_code == 1
    assert f"cannot reach http://127.0.0.1:{port}" in result.output


# --- staff commands --------------------------------------------------------------------------------------


def _staff(space_file: Path, who: str, role: Role | None = None) -> list[str]:
    args = ["--space", str(space_file), "--as", who, "--json"]
    return args + (["--role", role.value] if role else [])


def _publish(space_file: Path, epsilon: str = "3", approval: str = "auto") -> str:
    dataset_id = f"urn:dataset:cli:{uuid.uuid4().hex[:8]}"
    result = _invoke(
        "dataset",
        "publish",
        "--id",
        dataset_id,
        "--title",
        "T2D cohort",
        "--keyword",
        "diabetes",
        "--approval",
        approval,
        "--template",
        "aggregate-research",
        "--scenario",
        SCENARIO,
        "--k",
        "10",
        "--epsilon",
        epsilon,
        "--days",
        "365",
        *_staff(space_file, GZ),
    )
    assert result.exit_code == 0, result.output
    return dataset_id


def test_publish_browse_negotiate_and_transfer_from_the_command_line(space: Space, space_file: Path) -> None:
    dataset_id = _publish(space_file)

    browse = _invoke(
        "catalog", "browse", space.connectors[GZ].url, "--id", dataset_id, *_staff(space_file, HKU)
    )
    assert browse.exit_code == 0, browse.output
    (entry,) = json.loads(browse.stdout)["dataset"]
    offer = entry["hasPolicy"][0]
    assert {"leftOperand": "privacyBudget", "operator": "lteq", "rightOperand": "3"} in offer["permission"][
        0
    ]["constraint"]

    negotiation = _invoke(
        "negotiation",
        "start",
        "--provider",
        space.connectors[GZ].url,
        "--dataset",
        dataset_id,
        "--wait",
        *_staff(space_file, HKU),
    )
    assert negotiation.exit_code == 0, negotiation.output
    agreed = json.loads(negotiation.stdout)
    assert agreed["state"] == "FINALIZED"

    transfer = _invoke("transfer", "start", agreed["agreement_id"], "--wait", *_staff(space_file, HKU))
    assert transfer.exit_code == 0, transfer.output
    started = json.loads(transfer.stdout)
    assert started["state"] == "STARTED"
    assert started["data_address"]["endpoint"] == f"{space.connectors[GZ].url}/dataplane"


def test_a_steward_offers_a_narrower_policy_first_and_the_researcher_accepts(
    space: Space, space_file: Path
) -> None:
    dataset_id = _publish(space_file, epsilon="3")

    def propose(epsilon: str, *extra: str) -> Result:
        template = ["--template", "aggregate-research", "--scenario", SCENARIO, "--k", "10", "--days", "365"]
        consumer = ["--consumer", space.connectors[HKU].url, "--dataset", dataset_id]
        return _invoke(
            "negotiation",
            "propose",
            *consumer,
            *template,
            "--epsilon",
            epsilon,
            *extra,
            *_staff(space_file, GZ),
        )

    offered = propose("1", "--wait")
    assert offered.exit_code == 0, offered.output
    row = json.loads(offered.stdout)
    assert (row["role"], row["state"]) == ("provider", "OFFERED")
    assert row["consumer_pid"] is not None  # --wait: the consumer has acknowledged it
    for action, wait_for in (("accept", "AGREED"), ("verify", "FINALIZED")):
        done = _invoke(
            "negotiation",
            action,
            row["consumer_pid"],
            "--wait",
            "--wait-for",
            wait_for,
            *_staff(space_file, HKU),
        )
        assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["state"] == "FINALIZED"

    broader = propose("9")  # the dataset's offer allows ε 3
    assert broader.exit_code == 1
    assert "at least as restrictive" in broader.output


def test_published_dataset_is_listed_with_its_template_policy(space_file: Path) -> None:
    dataset_id = _publish(space_file, epsilon="2")
    listed = _invoke("dataset", "list", *_staff(space_file, GZ))
    assert listed.exit_code == 0, listed.output
    (row,) = [d for d in json.loads(listed.stdout) if d["id"] == dataset_id]
    budget = [c for c in row["offer"]["permission"][0]["constraint"] if c["leftOperand"] == "privacyBudget"]
    assert budget == [{"leftOperand": "privacyBudget", "operator": "lteq", "rightOperand": "2"}]


def test_url_and_api_key_come_from_the_environment(space: Space) -> None:
    node = space.connectors[GZ]
    env = {"HEALTHSPACE_CONNECTOR_URL": node.url, "HEALTHSPACE_API_KEY": node.keys[Role.STEWARD]}
    result = runner.invoke(app, ["dataset", "list", "--json"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), list)


def test_waiting_for_a_refused_negotiation_exits_1_with_the_reason(space: Space, space_file: Path) -> None:
    dataset_id = _publish(space_file, epsilon="3")
    result = _invoke(
        "negotiation",
        "start",
        "--provider",
        space.connectors[GZ].url,
        "--dataset",
        dataset_id,
        "--template",
        "aggregate-research",
        "--scenario",
        SCENARIO,
        "--epsilon",
        "9",
        "--wait",
        *_staff(space_file, HKU),
    )
    assert result.exit_code == 1
    assert json.loads(result.stdout)["state"] == "TERMINATED"
    assert "privacy budget" in result.output


def test_a_steward_counter_offer_and_approval_from_the_command_line(space: Space, space_file: Path) -> None:
    dataset_id = _publish(space_file, approval="manual")
    started = _invoke(
        "negotiation",
        "start",
        "--provider",
        space.connectors[GZ].url,
        "--dataset",
        dataset_id,
        "--wait",
        "--wait-for",
        "ACKNOWLEDGED",  # the provider has answered with its pid: the steward can find it
        *_staff(space_file, HKU),
    )
    assert started.exit_code == 0, started.output
    acked = json.loads(started.stdout)
    assert acked["state"] == "REQUESTED"
    provider_pid = acked["provider_pid"]
    assert provider_pid is not None

    countered = _invoke(
        "negotiation",
        "offer",
        provider_pid,
        "--template",
        "aggregate-research",
        "--scenario",
        SCENARIO,
        "--epsilon",
        "1",
        "--wait",
        *_staff(space_file, GZ),
    )
    assert countered.exit_code == 0, countered.output
    assert json.loads(countered.stdout)["state"] == "FINALIZED"


def test_retiring_an_agreement_from_the_command_line_terminates_its_transfer(
    space: Space, space_file: Path
) -> None:
    dataset_id = _publish(space_file)
    agreed = json.loads(
        _invoke(
            "negotiation",
            "start",
            "--provider",
            space.connectors[GZ].url,
            "--dataset",
            dataset_id,
            "--wait",
            *_staff(space_file, HKU),
        ).stdout
    )
    started = json.loads(
        _invoke("transfer", "start", agreed["agreement_id"], "--wait", *_staff(space_file, HKU)).stdout
    )

    retired = _invoke(
        "agreement",
        "retire",
        agreed["agreement_id"],
        "--reason",
        "consent withdrawn",
        *_staff(space_file, GZ),
    )
    assert retired.exit_code == 0, retired.output
    shown = _invoke(
        "transfer", "show", started["id"], "--wait", "--wait-for", "TERMINATED", *_staff(space_file, HKU)
    )
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["state"] == "TERMINATED"


def test_a_role_missing_from_the_space_file_is_a_clear_error(space_file: Path, tmp_path: Path) -> None:
    doc = json.loads(space_file.read_text())
    for p in doc["participants"]:
        p["api_keys"].pop("steward")
    thin = _write(tmp_path, "space.json", doc)
    result = _invoke("dataset", "list", "--space", str(thin), "--as", GZ)
    assert result.exit_code == 1
    assert f"holds no steward key for {GZ}" in result.output


@pytest.mark.parametrize(
    "group",
    [
        ["dsp", "send"],
        ["dataset", "publish"],
        ["catalog", "browse"],
        ["negotiation", "start"],
        ["negotiation", "offer"],
        ["negotiation", "request"],
        ["negotiation", "approve"],
        ["agreement", "retire"],
        ["transfer", "start"],
        ["transfer", "resume"],
    ],
)
def test_every_dsp_command_has_help(group: list[str]) -> None:
    result = runner.invoke(app, [*group, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
