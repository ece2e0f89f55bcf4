"""The `healthspace` command: run services, administer the space, generate data, verify evidence."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from healthspace.core.errors import HealthspaceError
from healthspace.core.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["app"]

app = typer.Typer(
    name="healthspace",
    help="A trusted health data space: authority, connectors, audit, synthetic hospitals.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
authority_app = typer.Typer(help="Run and administer the data space authority.", no_args_is_help=True)
connector_app = typer.Typer(help="Run and set up a participant's connector.", no_args_is_help=True)
app.add_typer(authority_app, name="authority")
app.add_typer(connector_app, name="connector")

console = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path, typer.Option("--data-dir", help="Service data directory.", envvar="HEALTHSPACE_DATA_DIR")
]
Url = Annotated[str, typer.Option("--url", help="Authority base URL.", envvar="HEALTHSPACE_AUTHORITY_URL")]
ApiKey = Annotated[
    str, typer.Option("--api-key", help="Admin API key (X-API-Key).", envvar="HEALTHSPACE_API_KEY")
]


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


# --- authority ------------------------------------------------------------------------------------


@authority_app.command("init")
def authority_init(
    data_dir: DataDir,
    authority_id: Annotated[str, typer.Option("--id", help="Authority id, e.g. gba-health-data-authority")],
    name: Annotated[str, typer.Option("--name", help="Legal name of the operator")],
) -> None:
    """Create the authority's key pair, database and initial admin and regulator API keys."""
    from healthspace.authority.app import init_authority

    try:
        keys = init_authority(_settings(data_dir), authority_id, name)
    except HealthspaceError as exc:
        raise _fail(exc.detail) from None
    console.print(f"authority [bold]{authority_id}[/bold] created in {data_dir}")
    for role, key in keys.items():
        console.print(f"  {role.value:10} API key: {key.secret}   (shown once)")


def _serve(create_app: Callable[[Settings], FastAPI], data_dir: Path, host: str, port: int) -> None:
    import uvicorn

    try:
        application = create_app(_settings(data_dir))
    except HealthspaceError as exc:
        raise _fail(exc.detail) from None
    uvicorn.run(application, host=host, port=port, log_level="warning")


Host = Annotated[str, typer.Option(help="Interface to listen on.")]


@authority_app.command("serve")
def authority_serve(
    data_dir: DataDir, host: Host = "127.0.0.1", port: Annotated[int, typer.Option(help="TCP port.")] = 8700
) -> None:
    """Run the authority service (HTTP)."""
    from healthspace.authority.app import create_app

    _serve(create_app, data_dir, host, port)


@authority_app.command("onboard")
def authority_onboard(
    url: Url,
    api_key: ApiKey,
    participant_id: Annotated[str, typer.Option("--id", help="Participant id (slug).")],
    legal_name: Annotated[str, typer.Option("--name", help="Legal name.")],
    participant_type: Annotated[str, typer.Option("--type", help="hospital, university, company, ...")],
    jurisdiction: Annotated[str, typer.Option(help="e.g. CN-GD, HK, MO")],
    public_key: Annotated[str, typer.Option(help="The participant's Ed25519 public key (base64url).")],
    role: Annotated[list[str], typer.Option("--role", help="Participant role; repeat for several.")],
    connector_url: Annotated[str | None, typer.Option(help="The participant's connector URL.")] = None,
    credential_out: Annotated[Path | None, typer.Option(help="Write the credential to this file.")] = None,
) -> None:
    """Admit a participant and print (or write) its membership credential."""
    from healthspace.client import ApiError, AuthorityClient

    body = {
        "id": participant_id,
        "legal_name": legal_name,
        "type": participant_type,
        "jurisdiction": jurisdiction,
        "roles": role,
        "public_key": public_key,
        "connector_url": connector_url,
    }
    try:
        with AuthorityClient(url, api_key) as c:
            result = c.onboard(body)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    if credential_out:
        credential_out.write_text(result["credential"])
        console.print(f"onboarded {participant_id}; credential written to {credential_out}")
    else:
        console.print(result["credential"])


@authority_app.command("list")
def authority_list(
    url: Url, api_key: ApiKey, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """List participants with their status."""
    from healthspace.client import ApiError, AuthorityClient

    try:
        with AuthorityClient(url, api_key) as c:
            rows = c.participants()
    except ApiError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("id", "name", "type", "jurisdiction", "status", "credential expires")
    for p in rows:
        table.add_row(
            p["id"],
            p["legal_name"],
            p["type"],
            p["jurisdiction"],
            p["status"],
            p["credential_expires_at"][:10],
        )
    console.print(table)


@authority_app.command("revoke")
def authority_revoke(
    url: Url,
    api_key: ApiKey,
    participant_id: Annotated[str, typer.Argument(help="Participant to revoke.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")],
) -> None:
    """Revoke a participant's membership credential."""
    from healthspace.client import ApiError, AuthorityClient

    try:
        with AuthorityClient(url, api_key) as c:
            p = c.revoke(participant_id, reason)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    console.print(f"{p['id']} is {p['status']} since {p['revoked_at']}")


@authority_app.command("scenarios")
def authority_scenarios(url: Url) -> None:
    """List the registered usage scenarios (public)."""
    from healthspace.client import ApiError, AuthorityClient

    try:
        with AuthorityClient(url) as c:
            rows = c.scenarios()
    except ApiError as exc:
        raise _fail(str(exc)) from None
    table = Table("id", "title", "purpose", "outputs", "approval", "valid until", "status")
    for s in rows:
        table.add_row(
            s["id"],
            s["title"],
            s["purpose_code"],
            ", ".join(s["output_types"]),
            f"{s['approving_body']} {s['approval_reference']}",
            s["valid_until"],
            s["status"],
        )
    console.print(table)


# --- connector ------------------------------------------------------------------------------------


@connector_app.command("init")
def connector_init(
    data_dir: DataDir,
    participant_id: Annotated[str, typer.Option("--id", help="Participant id (slug).")],
    legal_name: Annotated[str, typer.Option("--name", help="Legal name.")],
    participant_type: Annotated[str, typer.Option("--type", help="hospital, university, ...")],
    jurisdiction: Annotated[str, typer.Option(help="e.g. CN-GD, HK, MO")],
    public_url: Annotated[str, typer.Option(help="URL peers use to reach this connector.")],
    authority_url: Annotated[str, typer.Option(help="The authority's base URL.")],
    role: Annotated[list[str], typer.Option("--role", help="Participant role; repeat for several.")],
) -> None:
    """Create the connector's key pair and staff API keys, pinning the authority's public key."""
    from healthspace.client import ApiError, AuthorityClient
    from healthspace.connector.app import init_connector, public_key_of
    from healthspace.connector.config import ConnectorConfig

    try:
        with AuthorityClient(authority_url) as c:
            anchor = c.describe()
    except (ApiError, OSError) as exc:
        raise _fail(f"cannot read the authority at {authority_url}: {exc}") from None
    config = ConnectorConfig(
        participant_id=participant_id,
        legal_name=legal_name,
        participant_type=participant_type,
        jurisdiction=jurisdiction,
        roles=role,
        public_url=public_url,
        authority_url=authority_url.rstrip("/"),
        authority_id=anchor["id"],
        authority_public_key=anchor["public_key"],
    )
    settings = _settings(data_dir)
    try:
        keys = init_connector(settings, config)
    except HealthspaceError as exc:
        raise _fail(exc.detail) from None
    console.print(f"connector {participant_id} created in {data_dir}")
    console.print(f"  public key (give it to the authority): {public_key_of(settings)}")
    for r, key in keys.items():
        console.print(f"  {r.value:10} API key: {key.secret}   (shown once)")
    console.print(f"  after onboarding, save the credential as {data_dir}/credential.jwt")


@connector_app.command("serve")
def connector_serve(
    data_dir: DataDir,
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8710,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Processes serving the port, each a full connector on the one control-plane database "
            "(PostgreSQL only: set HEALTHSPACE_DATABASE_URL). One process runs one Python thread at a "
            "time; more processes use more cores.",
        ),
    ] = 1,
) -> None:
    """Run a connector service (HTTP)."""
    from healthspace.connector.app import create_app

    if workers == 1:
        _serve(create_app, data_dir, host, port)
        return
    _serve_workers(data_dir, host, port, workers)


def _serve_workers(data_dir: Path, host: str, port: int, workers: int) -> None:
    """`connector serve --workers N`: uvicorn's supervisor shares one listening socket among N worker
    processes (and starts a new one when one dies); each worker builds its connector from the
    environment (`app_from_environment`)."""
    import uvicorn
    from sqlalchemy.engine import make_url

    from healthspace.connector.app import check_startup

    settings = _settings(data_dir)
    if make_url(settings.database_url_for("connector")).get_backend_name() != "postgresql":
        raise _fail(
            "--workers above 1 needs a PostgreSQL control plane (set HEALTHSPACE_DATABASE_URL): a SQLite "
            "file has one writer at a time, and the connector's processes share their database"
        )
    try:
        # Here once, so a connector that cannot start says why once instead of from every worker;
        # the database is migrated before the workers open it.
        check_startup(settings)
    except HealthspaceError as exc:
        raise _fail(exc.detail) from None
    os.environ["HEALTHSPACE_DATA_DIR"] = str(data_dir.resolve())  # what the workers read
    uvicorn.run(
        "healthspace.connector.app:app_from_environment",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level="warning",
    )


# --- demo and benchmarks --------------------------------------------------------------------------


@app.command("demo")
def demo(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where the demo space lives.", envvar="HEALTHSPACE_DATA_DIR")
    ] = Path(".healthspace"),
    patients: Annotated[int, typer.Option(min=100, help="Synthetic patients per hospital.")] = 20_000,
    base_port: Annotated[
        int, typer.Option(help="First TCP port to try; services take the next free ones.")
    ] = 8700,
    once: Annotated[bool, typer.Option("--once", help="Self-check, print a JSON summary and exit.")] = False,
) -> None:
    """Start a data space on loopback: an authority, three hospitals and a university, one process each."""
    from healthspace.cli.demo import run_demo

    raise typer.Exit(
        code=run_demo(data_dir, patients=patients, base_port=base_port, once=once, console=console)
    )


@app.command("bench")
def bench(
    suite: Annotated[list[str] | None, typer.Option("--suite", help="Run only these suites.")] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Small sizes: a smoke run, not a measurement.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Directory for the JSON results.")] = Path("benchmarks/results"),
) -> None:
    """Run the benchmarks and write JSON results with medians and ratios to same-run baselines."""
    from healthspace.bench.runner import run_suites

    raise typer.Exit(code=run_suites(suite or [], quick=quick, out=out, console=console))


def _register_optional() -> None:
    """Commands owned by other contexts, mounted here so `healthspace --help` lists them."""
    from healthspace.audit.cli import audit_app
    from healthspace.cli.dsp import register as register_dsp
    from healthspace.cli.policy import policy_app
    from healthspace.cli.review import review_app
    from healthspace.cli.study import study_app
    from healthspace.data.cli import data_app
    from healthspace.synth.cli import synth_command

    app.add_typer(audit_app, name="audit", help="Export and verify audit logs.")
    app.add_typer(data_app, name="data", help="Load clinical data against a standard; quality; quarantine.")
    app.command("synth")(synth_command)
    register_dsp(app)
    app.add_typer(policy_app, name="policy")
    app.add_typer(review_app, name="review")
    app.add_typer(
        study_app, name="study", help="Run a federated study across the hospitals you have agreements with."
    )


_register_optional()
