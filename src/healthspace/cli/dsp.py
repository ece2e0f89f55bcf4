"""Operator commands for DSP: send a raw signed DSP message, and manage datasets, contracts and transfers."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from healthspace.client import ApiError, ConnectorClient
from healthspace.core.apikeys import Role as StaffRole
from healthspace.core.errors import HealthspaceError

__all__ = [
    "Identity",
    "agreement_app",
    "catalog_app",
    "dataset_app",
    "dsp_app",
    "load_identity",
    "negotiation_app",
    "register",
    "transfer_app",
]

dsp_app = typer.Typer(help="Talk DSP 2025-1 to any connector as a participant.", no_args_is_help=True)
dataset_app = typer.Typer(help="Publish this connector's datasets with their offers.", no_args_is_help=True)
catalog_app = typer.Typer(help="Browse another connector's DSP catalog.", no_args_is_help=True)
negotiation_app = typer.Typer(help="Contract negotiations (DSP), either side.", no_args_is_help=True)
agreement_app = typer.Typer(help="Contract agreements held by this connector.", no_args_is_help=True)
transfer_app = typer.Typer(help="Transfer processes (DSP), either side.", no_args_is_help=True)

console = Console()
err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Mount the commands of this module on the `healthspace` command."""
    app.add_typer(dsp_app, name="dsp")
    app.add_typer(dataset_app, name="dataset")
    app.add_typer(catalog_app, name="catalog")
    app.add_typer(negotiation_app, name="negotiation")
    app.add_typer(agreement_app, name="agreement")
    app.add_typer(transfer_app, name="transfer")


class CliError(Exception):
    """An operator mistake or an unreachable service: printed as one line, exit code 1."""


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the failures an operator can cause into one clear line and exit code 1."""
    try:
        yield
    except CliError as exc:
        raise _fail(str(exc)) from None
    except ApiError as exc:
        raise _fail(str(exc)) from None
    except HealthspaceError as exc:
        raise _fail(exc.detail) from None
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {_where(exc)}: {type(exc).__name__} {exc}".rstrip()) from None


def _where(exc: httpx.HTTPError) -> str:
    try:
        return str(exc.request.url)
    except RuntimeError:
        return "the service"


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text() if str(path) != "-" else typer.get_text_stream("stdin").read()
    except FileNotFoundError:
        raise CliError(f"no {what} at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the {what} {path}: {type(exc).__name__}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"the {what} {path} is not JSON: {exc}") from None


def _echo_json(value: Any) -> None:
    # Plain output (no rich wrapping) so machines can parse it.
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


# --- identity ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A participant able to sign request tokens: its id, its key and its membership credential."""

    participant_id: str
    key: Any  # healthspace.identity.keys.SigningKey (imported lazily: keeps `--help` fast)
    credential: str


def _space_entry(doc: dict[str, Any], path: Path, participant: str | None) -> dict[str, Any]:
    entries = doc.get("participants")
    if not isinstance(entries, list):
        raise CliError(f"{path} has no 'participants' list; is it the demo's space.json?")
    ids = [e.get("id") for e in entries if isinstance(e, dict)]
    if not participant:
        raise CliError(
            f"{path} is a space file; name the participant with --as (one of: {', '.join(map(str, ids))})"
        )
    for entry in entries:
        if isinstance(entry, dict) and entry.get("id") == participant:
            return entry
    raise CliError(f"no participant {participant!r} in {path} (known: {', '.join(map(str, ids))})")


def _file_member(doc: dict[str, Any], name: str, base: Path, source: Path) -> Path | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise CliError(f"'{name}' in {source} must be a file path")
    path = Path(value)
    return path if path.is_absolute() else base / path


def load_identity(
    path: Path, participant: str | None = None, environ: dict[str, str] | None = None
) -> Identity:
    """Read a participant identity from an identity file or from the demo's `space.json`.

    Identity file: `{"id": ..., "key": FILE, "credential": FILE, "kek": FILE}`, relative paths against
    the file's folder. space.json: the participant named `participant`, its `identity` member (same three
    paths). Without a `kek` path, `HEALTHSPACE_KEK` is the key-encryption key. Raises CliError or
    ConfigurationError (wrong KEK, damaged key) with a plain message that never holds the KEK.
    """
    from healthspace.identity.keys import SigningKey

    environ = dict(os.environ) if environ is None else environ
    doc = _read_json(path, "identity file")
    if not isinstance(doc, dict):
        raise CliError(f"{path} is not a JSON object")
    if "participants" in doc:
        entry = _space_entry(doc, path, participant)
        participant_id = str(entry["id"])
        ident = entry.get("identity")
        if not isinstance(ident, dict):
            raise CliError(f"participant {participant_id!r} in {path} has no 'identity' member")
    else:
        ident = doc
        pid = doc.get("id")
        if not isinstance(pid, str) or not pid:
            raise CliError(f"the identity file {path} has no 'id' (the participant id)")
        if participant and participant != pid:
            raise CliError(f"the identity file {path} is {pid!r}, not {participant!r}")
        participant_id = pid
    base = path.parent
    key_path = _file_member(ident, "key", base, path)
    credential_path = _file_member(ident, "credential", base, path)
    if key_path is None or credential_path is None:
        raise CliError(f"the identity in {path} needs 'key' and 'credential' file paths")
    kek_path = _file_member(ident, "kek", base, path)
    if kek_path is not None:
        try:
            kek = kek_path.read_text().strip().encode()
        except FileNotFoundError:
            raise CliError(f"no KEK file at {kek_path}") from None
    elif environ.get("HEALTHSPACE_KEK"):
        kek = environ["HEALTHSPACE_KEK"].encode()
    else:
        raise CliError(f"the identity in {path} names no 'kek' file and HEALTHSPACE_KEK is not set")
    try:
        credential = credential_path.read_text().strip()
    except FileNotFoundError:
        raise CliError(f"no credential file at {credential_path}") from None
    if not credential:
        raise CliError(f"the credential file {credential_path} is empty")
    return Identity(participant_id, SigningKey.load(key_path, kek), credential)


# --- dsp send ----------------------------------------------------------------------------------------

# DSP 2025-1 paths (relative to the connector's DSP base) and the message each expects.
_PID = r"[^/]+"
_PATH_TYPES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"^/{p}$"), t)
    for p, t in (
        ("catalog/request", "CatalogRequestMessage"),
        ("negotiations/request", "ContractRequestMessage"),
        ("negotiations/offers", "ContractOfferMessage"),
        (f"negotiations/{_PID}/request", "ContractRequestMessage"),
        (f"negotiations/{_PID}/offers", "ContractOfferMessage"),
        (f"negotiations/{_PID}/events", "ContractNegotiationEventMessage"),
        (f"negotiations/{_PID}/agreement", "ContractAgreementMessage"),
        (f"negotiations/{_PID}/agreement/verification", "ContractAgreementVerificationMessage"),
        (f"negotiations/{_PID}/termination", "ContractNegotiationTerminationMessage"),
        ("transfers/request", "TransferRequestMessage"),
        (f"transfers/{_PID}/start", "TransferStartMessage"),
        (f"transfers/{_PID}/completion", "TransferCompletionMessage"),
        (f"transfers/{_PID}/suspension", "TransferSuspensionMessage"),
        (f"transfers/{_PID}/termination", "TransferTerminationMessage"),
    )
]
_HEADERS_OF_INTEREST = ("content-type", "location", "link", "www-authenticate", "retry-after")


def expected_type(path: str) -> str | None:
    """The DSP message type `path` takes, or None for a path DSP does not define (or a GET path)."""
    bare = "/" + path.split("?", 1)[0].strip("/")
    for pattern, type_name in _PATH_TYPES:
        if pattern.match(bare):
            return type_name
    return None


def _check_locally(document: Any, path: str) -> str:
    from healthspace.core.errors import ConfigurationError
    from healthspace.protocol.errors import DspValidationError
    from healthspace.protocol.schemas import validate_message

    try:
        type_name = validate_message(document)
    except DspValidationError as exc:
        problems = "\n".join(f"  {p}" for p in exc.problems)
        raise CliError(
            f"refused locally: {exc.detail}\n{problems}\n(--no-validate sends it anyway)"
        ) from None
    except ConfigurationError as exc:
        raise CliError(
            f"cannot validate: {exc.detail} (set HEALTHSPACE_DSP_SCHEMA_DIR or pass --no-validate)"
        ) from None
    wanted = expected_type(path)
    if wanted is not None and wanted != type_name:
        raise CliError(
            f"refused locally: {path} takes a {wanted}, the message is a {type_name} "
            "(--no-validate sends it anyway)"
        )
    return type_name


def _audience_of(http: httpx.Client, base: str) -> str:
    r = http.get(f"{base}/.well-known/healthspace")
    if r.status_code != 200:
        raise CliError(
            f"{base}/.well-known/healthspace answered HTTP {r.status_code}; name the receiver with --audience"
        )
    try:
        return str(r.json()["id"])
    except (ValueError, KeyError, TypeError):
        raise CliError(f"{base} does not describe itself; name the receiver with --audience") from None


def _print_response(r: httpx.Response) -> None:
    console.print(f"HTTP {r.status_code} {r.reason_phrase}", highlight=False)
    for name in _HEADERS_OF_INTEREST:
        if name in r.headers:
            console.print(f"{name}: {r.headers[name]}", highlight=False, soft_wrap=True)
    if not r.content:
        return
    try:
        body = r.json()
    except ValueError:
        typer.echo(r.text)
        return
    _echo_json(body)


@dsp_app.command("send")
def send(
    path: Annotated[str, typer.Argument(help="DSP path on the receiver, e.g. /catalog/request.")],
    message: Annotated[
        Path | None, typer.Argument(help="The message (JSON file; '-' reads stdin). Not with --get.")
    ] = None,
    identity: Annotated[
        Path,
        typer.Option(
            "--identity",
            "--space",
            help="Identity file {id, key, credential, kek} or the demo's space.json (with --as).",
            envvar="HEALTHSPACE_IDENTITY",
        ),
    ] = Path("identity.json"),
    as_: Annotated[str | None, typer.Option("--as", help="Participant in a space.json.")] = None,
    to: Annotated[str, typer.Option("--to", help="The receiving connector's base URL.")] = "",
    audience: Annotated[
        str | None,
        typer.Option(help="The receiver's participant id; default: its /.well-known/healthspace."),
    ] = None,
    get: Annotated[bool, typer.Option("--get", help="GET the path instead of POSTing a message.")] = False,
    validate: Annotated[
        bool, typer.Option("--validate/--no-validate", help="Check the message against the DSP schema.")
    ] = True,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the receiver.")] = 10.0,
) -> None:
    """Sign a request token as a participant and send one raw DSP message; print status, headers, body.

    Exit code 0 when the receiver answers 2xx, 1 otherwise (or when nothing was sent).
    """
    if not to:
        raise _fail("name the receiving connector with --to URL")
    if get and message is not None:
        raise _fail("--get sends no message; drop the MESSAGE argument")
    if not get and message is None:
        raise _fail("a POST needs a MESSAGE file (or use --get)")
    base = to.rstrip("/")
    url = f"{base}/{path.lstrip('/')}"
    with _errors():
        body: bytes | None = None
        if message is not None:
            document = _read_json(message, "message")
            if validate:
                _check_locally(document, path)
            body = json.dumps(document).encode()
        who = load_identity(identity, as_)
        with httpx.Client(timeout=timeout) as http:
            aud = audience or _audience_of(http, base)
            from healthspace.identity.tokens import mint_request_token

            token = mint_request_token(who.key, who.credential, who.participant_id, aud, datetime.now(UTC))
            headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            r = http.request("GET" if get else "POST", url, content=body, headers=headers)
    _print_response(r)
    if not r.is_success:
        raise typer.Exit(code=1)


# --- staff connection -------------------------------------------------------------------------------


UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help="Connector base URL.", envvar="HEALTHSPACE_CONNECTOR_URL", show_default=False),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key", help="Staff API key (X-API-Key).", envvar="HEALTHSPACE_API_KEY", show_default=False
    ),
]
SpaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--space", help="The demo's space.json: URL and key of --as in --role (wins over --url/--api-key)."
    ),
]
AsOpt = Annotated[str | None, typer.Option("--as", help="Participant id in --space.")]
RoleOpt = Annotated[
    StaffRole | None,
    typer.Option("--role", help="Staff role whose key --space supplies (default: the command's)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="Long-poll until the process reaches --wait-for (or ends).")
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.0, help="Seconds --wait waits at most.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept in the process and the audit log).")]


@dataclass(frozen=True)
class Conn:
    url: str | None
    api_key: str | None
    space: Path | None
    as_: str | None
    role: StaffRole | None

    def client(self, default_role: StaffRole, timeout: float = 30.0) -> ConnectorClient:
        url, key = self.url, self.api_key
        if self.space is not None:
            doc = _read_json(self.space, "space file")
            if not isinstance(doc, dict):
                raise CliError(f"{self.space} is not a JSON object")
            entry = _space_entry(doc, self.space, self.as_)
            role = (self.role or default_role).value
            keys = entry.get("api_keys") or {}
            if role not in keys:
                raise CliError(f"{self.space} holds no {role} key for {entry['id']}")
            url, key = str(entry["url"]), str(keys[role])
        if not url:
            raise CliError(
                "name the connector with --url (or HEALTHSPACE_CONNECTOR_URL), or --space and --as"
            )
        if not key:
            raise CliError("give a staff key with --api-key (or HEALTHSPACE_API_KEY), or --space and --as")
        return ConnectorClient(url, key, timeout=timeout)


def _conn(
    url: str | None, api_key: str | None, space: Path | None, as_: str | None, role: StaffRole | None
) -> Conn:
    return Conn(url, api_key, space, as_, role)


# --- policies ---------------------------------------------------------------------------------------

OfferFileOpt = Annotated[Path | None, typer.Option("--offer", help="ODRL offer (DSP Offer JSON file).")]
TemplateOpt = Annotated[
    str | None,
    typer.Option("--template", help="Policy template: aggregate-research, deidentified-extract, ..."),
]
ScenarioOpt = Annotated[str | None, typer.Option("--scenario", help="Template: registered scenario id.")]
KOpt = Annotated[int | None, typer.Option("--k", help="Template: minimum cell size / k-anonymity.")]
EpsOpt = Annotated[float | None, typer.Option("--epsilon", help="Template: total privacy budget ε.")]
DaysOpt = Annotated[int | None, typer.Option("--days", help="Template: days valid from the agreement.")]
UsesOpt = Annotated[int | None, typer.Option("--max-uses", help="Template: maximum number of uses.")]
JurOpt = Annotated[
    list[str] | None, typer.Option("--jurisdiction", help="Template: allowed consumer jurisdiction; repeat.")
]
OfferIdOpt = Annotated[str | None, typer.Option("--offer-id", help="The offer's @id (default: derived).")]


def _policy(
    offer_file: Path | None,
    template_name: str | None,
    *,
    scenario: str | None,
    k: int | None,
    epsilon: float | None,
    days: int | None,
    max_uses: int | None,
    jurisdictions: list[str] | None,
    offer_id: str | None,
) -> dict[str, Any] | None:
    """The offer from --offer or from --template and its parameters; None when neither is given."""
    if offer_file is not None and template_name is not None:
        raise CliError("give --offer or --template, not both")
    if offer_file is not None:
        offer = _read_json(offer_file, "offer")
        if not isinstance(offer, dict):
            raise CliError(f"the offer in {offer_file} is not a JSON object")
        if offer_id:
            offer["@id"] = offer_id
        return offer
    given = {"k": k, "epsilon": epsilon, "valid_for_days": days, "max_uses": max_uses}
    if template_name is None:
        if scenario or any(v is not None for v in given.values()) or jurisdictions:
            raise CliError("template parameters need --template NAME")
        return None
    from healthspace.policy.templates import template

    params: dict[str, Any] = {n: v for n, v in given.items() if v is not None}
    if jurisdictions:
        params["jurisdictions"] = jurisdictions
    return template(template_name, uid=offer_id, scenario=scenario, **params)


def _constraints(policy: dict[str, Any]) -> str:
    parts = []
    for perm in policy.get("permission") or []:
        for c in perm.get("constraint") or []:
            if isinstance(c, dict) and "leftOperand" in c:
                right = c.get("rightOperand")
                right = ",".join(map(str, right)) if isinstance(right, list) else right
                parts.append(f"{c['leftOperand']} {c.get('operator')} {right}")
    return "; ".join(parts)


# --- datasets ---------------------------------------------------------------------------------------


@dataset_app.command("publish")
def dataset_publish(
    dataset_id: Annotated[str, typer.Option("--id", help="Dataset id, e.g. urn:dataset:t2d-gz.")],
    title: Annotated[str, typer.Option(help="Title in the catalog.")],
    description: Annotated[str, typer.Option(help="Description in the catalog.")] = "",
    keyword: Annotated[list[str] | None, typer.Option("--keyword", help="Keyword; repeat.")] = None,
    approval: Annotated[str, typer.Option(help="auto, manual (a steward approves) or stepwise.")] = "auto",
    offer: OfferFileOpt = None,
    template_name: TemplateOpt = None,
    scenario: ScenarioOpt = None,
    k: KOpt = None,
    epsilon: EpsOpt = None,
    days: DaysOpt = None,
    max_uses: UsesOpt = None,
    jurisdiction: JurOpt = None,
    offer_id: OfferIdOpt = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish (or replace) a dataset with its offer: from a file (--offer) or a template (--template)."""
    with _errors():
        policy = _policy(
            offer,
            template_name,
            scenario=scenario,
            k=k,
            epsilon=epsilon,
            days=days,
            max_uses=max_uses,
            jurisdictions=jurisdiction,
            offer_id=offer_id,
        )
        if policy is None:
            raise CliError("a dataset needs an offer: --offer FILE or --template NAME --scenario ID ...")
        body = {
            "id": dataset_id,
            "title": title,
            "description": description,
            "keywords": keyword or [],
            "offer": policy,
            "approval": approval,
        }
        with _conn(url, api_key, space, as_, role).client(StaffRole.STEWARD) as c:
            published = c.publish_dataset(body)
    if as_json:
        _echo_json(published)
        return
    console.print(f"published {published['id']} with offer {published['offer'].get('@id')}", highlight=False)
    console.print(f"  {_constraints(published['offer'])}", highlight=False, soft_wrap=True)


@dataset_app.command("list")
def dataset_list(
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the datasets this connector publishes."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.STEWARD) as c:
        rows = c.datasets()
    if as_json:
        _echo_json(rows)
        return
    table = Table("id", "title", "approval", "offer", "constraints")
    for d in rows:
        table.add_row(d["id"], d["title"], d["approval"], d["offer"].get("@id", ""), _constraints(d["offer"]))
    console.print(table)


# --- catalog ----------------------------------------------------------------------------------------


@catalog_app.command("browse")
def catalog_browse(
    provider: Annotated[str, typer.Argument(help="The provider connector's base URL.")],
    filter_: Annotated[
        list[str] | None, typer.Option("--filter", help="Text that must match (id, title, keyword); repeat.")
    ] = None,
    dataset_id: Annotated[str | None, typer.Option("--id", help="Only this dataset.")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a provider's DSP catalog through this connector (signed as this participant)."""
    items: list[Any] = list(filter_ or [])
    if dataset_id:
        items.append({"id": dataset_id})
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.RESEARCHER) as c:
        catalog = c.query_catalog(provider, items or None)
    if as_json:
        _echo_json(catalog)
        return
    console.print(f"catalog of {catalog.get('participantId', provider)}", highlight=False)
    table = Table("dataset", "title", "keywords", "offer", "constraints")
    for d in catalog.get("dataset", []):
        offers = d.get("hasPolicy") or [{}]
        table.add_row(
            d.get("@id", ""),
            d.get("title", ""),
            ", ".join(d.get("keyword") or []),
            offers[0].get("@id", ""),
            _constraints(offers[0]),
        )
    console.print(table)


# --- negotiations -----------------------------------------------------------------------------------

_NEGOTIATION_FINAL = {"FINALIZED", "TERMINATED"}
_TRANSFER_FINAL = {"COMPLETED", "TERMINATED"}


def _wait(
    read: Callable[[list[str], float], dict[str, Any]],
    wanted: list[str],
    final: set[str],
    timeout: float,
) -> dict[str, Any]:
    """Long-poll (≤ 55 s per call) until the process is in `wanted` or final, or `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.0, deadline - time.monotonic())
        current = read(wanted, min(left, 55.0))
        if current["state"] in wanted or current["state"] in final or left <= 0:
            return current
        time.sleep(0.05)  # the server answered early without a match: do not spin


def _finish(kind: str, row: dict[str, Any], wanted: list[str] | None, as_json: bool) -> None:
    if as_json:
        _echo_json(row)
    else:
        _show(kind, row)
    if wanted and not _reached(row, wanted):
        why = f" ({row['terminal_reason']})" if row.get("terminal_reason") else ""
        raise _fail(f"{kind} {row['id']} is {row['state']}{why}, not {' or '.join(wanted)}")


def _show(kind: str, row: dict[str, Any]) -> None:
    table = Table("field", "value", show_header=False)
    for name, value in row.items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        table.add_row(name, text)
    console.print(f"{kind} {row['id']}: [bold]{row['state']}[/bold]" if "state" in row else kind)
    console.print(table)


# Not a DSP state: "the counterparty has answered with its process id" (it has the request or offer).
ACKNOWLEDGED = "ACKNOWLEDGED"


def _negotiation_wait(c: ConnectorClient, pid: str, wanted: list[str], timeout: float) -> dict[str, Any]:
    if ACKNOWLEDGED not in wanted:
        return _wait(
            lambda w, t: c.negotiation(pid, wait_for=w, timeout_s=t), wanted, _NEGOTIATION_FINAL, timeout
        )
    # Every state after the acknowledgement implies it, so waiting for it alone is enough.
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.0, deadline - time.monotonic())
        row = c.negotiation(pid, acknowledged=True, timeout_s=min(left, 55.0))
        if _reached(row, wanted) or row["state"] in _NEGOTIATION_FINAL or left <= 0:
            return row
        time.sleep(0.05)


def _acknowledged(row: dict[str, Any]) -> bool:
    return row["provider_pid"] is not None and row["consumer_pid"] is not None


def _reached(row: dict[str, Any], wanted: list[str]) -> bool:
    return row["state"] in wanted or (ACKNOWLEDGED in wanted and _acknowledged(row))


def _catalog_offer(c: ConnectorClient, provider: str, dataset_id: str) -> dict[str, Any]:
    catalog = c.query_catalog(provider, [{"id": dataset_id}])
    for d in catalog.get("dataset", []):
        if d.get("@id") == dataset_id and d.get("hasPolicy"):
            offer: dict[str, Any] = dict(d["hasPolicy"][0])
            return offer
    raise CliError(f"{provider} offers no dataset {dataset_id!r} in its catalog")


WaitForNegOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--wait-for",
        help="State(s) --wait waits for (default FINALIZED); ACKNOWLEDGED: until the counterparty has"
        " answered with its process id.",
    ),
]


@negotiation_app.command("start")
def negotiation_start(
    provider: Annotated[str, typer.Option("--provider", help="The provider connector's base URL.")],
    dataset_id: Annotated[str, typer.Option("--dataset", help="Dataset id in the provider's catalog.")],
    offer: OfferFileOpt = None,
    template_name: TemplateOpt = None,
    scenario: ScenarioOpt = None,
    k: KOpt = None,
    epsilon: EpsOpt = None,
    days: DaysOpt = None,
    max_uses: UsesOpt = None,
    jurisdiction: JurOpt = None,
    offer_id: OfferIdOpt = None,
    provider_id: Annotated[
        str | None, typer.Option(help="Provider's participant id (default: asked).")
    ] = None,
    manual: Annotated[
        bool, typer.Option("--manual", help="A researcher accepts offers and verifies agreements.")
    ] = False,
    wait: WaitOpt = False,
    wait_for: WaitForNegOpt = None,
    timeout: TimeoutOpt = 30.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Request a contract for a dataset: the catalog's offer, or your own (--offer / --template)."""
    wanted = (wait_for or ["FINALIZED"]) if wait else None
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.RESEARCHER, timeout + 30) as c:
        policy = _policy(
            offer,
            template_name,
            scenario=scenario,
            k=k,
            epsilon=epsilon,
            days=days,
            max_uses=max_uses,
            jurisdictions=jurisdiction,
            offer_id=offer_id,
        )
        if policy is None:
            policy = _catalog_offer(c, provider, dataset_id)
        policy = {**policy, "target": dataset_id}
        row = c.request_offer(provider, policy, provider_id=provider_id, auto=not manual)
        if wanted:
            row = _negotiation_wait(c, row["id"], wanted, timeout)
    _finish("negotiation", row, wanted, as_json)


@negotiation_app.command("propose")
def negotiation_propose(
    consumer: Annotated[str, typer.Option("--consumer", help="The consumer connector's base URL.")],
    dataset_id: Annotated[str, typer.Option("--dataset", help="One of your published datasets.")],
    offer: OfferFileOpt = None,
    template_name: TemplateOpt = None,
    scenario: ScenarioOpt = None,
    k: KOpt = None,
    epsilon: EpsOpt = None,
    days: DaysOpt = None,
    max_uses: UsesOpt = None,
    jurisdiction: JurOpt = None,
    offer_id: OfferIdOpt = None,
    consumer_id: Annotated[
        str | None, typer.Option(help="Consumer's participant id (default: asked).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the consumer has acknowledged the offer.")
    ] = False,
    timeout: TimeoutOpt = 30.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Provider: begin a negotiation by offering a dataset to a consumer (its published offer, or a
    narrower one of yours); `offer PID` is the counter-offer within a negotiation.

    The consumer's researcher sees it in OFFERED and accepts or terminates; a policy broader than the
    dataset's own offer is refused."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.STEWARD, timeout + 30) as c:
        policy = _policy(
            offer,
            template_name,
            scenario=scenario,
            k=k,
            epsilon=epsilon,
            days=days,
            max_uses=max_uses,
            jurisdictions=jurisdiction,
            offer_id=offer_id,
        )
        row = c.offer_to(consumer, dataset_id, policy, consumer_id=consumer_id)
        if wait:
            row = _negotiation_wait(c, row["id"], [ACKNOWLEDGED], timeout)
    _finish("negotiation", row, [ACKNOWLEDGED] if wait else None, as_json)


@negotiation_app.command("list")
def negotiation_list(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List negotiations, both sides, newest first."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.ADMIN) as c:
        rows = c.negotiations(limit)
    if as_json:
        _echo_json(rows)
        return
    table = Table("id", "role", "state", "counterparty", "dataset", "agreement", "pending", "updated")
    for n in rows:
        table.add_row(
            n["id"],
            n["role"],
            n["state"],
            n["counterparty_id"],
            n["dataset_id"] or "",
            n["agreement_id"] or "",
            n["pending"] or "",
            n["updated_at"][:19],
        )
    console.print(table)


@negotiation_app.command("show")
def negotiation_show(
    pid: Annotated[str, typer.Argument(help="The negotiation's id (our pid).")],
    wait: WaitOpt = False,
    wait_for: WaitForNegOpt = None,
    timeout: TimeoutOpt = 30.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one negotiation; with --wait, once it reaches --wait-for (default FINALIZED) or ends."""
    wanted = (wait_for or ["FINALIZED"]) if wait else None
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.ADMIN, timeout + 30) as c:
        row = _negotiation_wait(c, pid, wanted, timeout) if wanted else c.negotiation(pid)
    _finish("negotiation", row, wanted, as_json)


def _negotiation_step(
    action: str,
    default_role: StaffRole,
    pid: str,
    conn: Conn,
    *,
    reason: str = "",
    policy: dict[str, Any] | None = None,
    wanted: list[str] | None = None,
    timeout: float = 30.0,
    as_json: bool = False,
) -> None:
    with _errors(), conn.client(default_role, timeout + 30) as c:
        row = c.negotiation_action(pid, action, reason=reason, offer=policy)
        if wanted:
            row = _negotiation_wait(c, pid, wanted, timeout)
    _finish("negotiation", row, wanted, as_json)


def _simple_negotiation_command(action: str, default_role: StaffRole, doc: str) -> None:
    def command(
        pid: Annotated[str, typer.Argument(help="The negotiation's id (our pid).")],
        reason: ReasonOpt = "",
        wait: WaitOpt = False,
        wait_for: WaitForNegOpt = None,
        timeout: TimeoutOpt = 30.0,
        url: UrlOpt = None,
        api_key: KeyOpt = None,
        space: SpaceOpt = None,
        as_: AsOpt = None,
        role: RoleOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        wanted = (wait_for or ["FINALIZED"]) if wait else None
        conn = _conn(url, api_key, space, as_, role)
        _negotiation_step(
            action, default_role, pid, conn, reason=reason, wanted=wanted, timeout=timeout, as_json=as_json
        )

    command.__doc__ = doc
    negotiation_app.command(action)(command)


for _action, _role, _doc in (
    ("approve", StaffRole.STEWARD, "Provider: agree to a request waiting for approval."),
    ("reject", StaffRole.STEWARD, "Provider: refuse a request (--reason tells the consumer why)."),
    ("finalize", StaffRole.STEWARD, "Provider: finalize a verified agreement (stepwise datasets)."),
    ("accept", StaffRole.RESEARCHER, "Consumer: accept the provider's current offer."),
    ("verify", StaffRole.RESEARCHER, "Consumer: verify a received agreement."),
    ("terminate", StaffRole.ADMIN, "Either side: end the negotiation (--reason tells the peer why)."),
):
    _simple_negotiation_command(_action, _role, _doc)


def _counter_command(action: str, default_role: StaffRole, doc: str) -> None:
    def command(
        pid: Annotated[str, typer.Argument(help="The negotiation's id (our pid).")],
        offer: OfferFileOpt = None,
        template_name: TemplateOpt = None,
        scenario: ScenarioOpt = None,
        k: KOpt = None,
        epsilon: EpsOpt = None,
        days: DaysOpt = None,
        max_uses: UsesOpt = None,
        jurisdiction: JurOpt = None,
        offer_id: OfferIdOpt = None,
        wait: WaitOpt = False,
        wait_for: WaitForNegOpt = None,
        timeout: TimeoutOpt = 30.0,
        url: UrlOpt = None,
        api_key: KeyOpt = None,
        space: SpaceOpt = None,
        as_: AsOpt = None,
        role: RoleOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        wanted = (wait_for or ["FINALIZED"]) if wait else None
        with _errors():
            policy = _policy(
                offer,
                template_name,
                scenario=scenario,
                k=k,
                epsilon=epsilon,
                days=days,
                max_uses=max_uses,
                jurisdictions=jurisdiction,
                offer_id=offer_id,
            )
        if policy is None:
            raise _fail("a counter-offer needs a policy: --offer FILE or --template NAME --scenario ID ...")
        conn = _conn(url, api_key, space, as_, role)
        _negotiation_step(
            action, default_role, pid, conn, policy=policy, wanted=wanted, timeout=timeout, as_json=as_json
        )

    command.__doc__ = doc
    negotiation_app.command(action)(command)


_counter_command(
    "offer",
    StaffRole.STEWARD,
    "Provider: send a counter-offer (ContractOfferMessage); an auto consumer accepts it when it permits "
    "no more than it asked for.",
)
_counter_command(
    "request",
    StaffRole.RESEARCHER,
    "Consumer: send a counter-request (ContractRequestMessage) to the provider's offer.",
)


# --- agreements -------------------------------------------------------------------------------------


@agreement_app.command("list")
def agreement_list(
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List agreements this connector holds, as provider or consumer."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.ADMIN) as c:
        rows = c.agreements()
    if as_json:
        _echo_json(rows)
        return
    table = Table("id", "role", "provider", "consumer", "dataset", "signed", "retired")
    for a in rows:
        table.add_row(
            a["id"],
            a["role"],
            a["provider_id"],
            a["consumer_id"],
            a["dataset_id"],
            a["signed_at"][:19],
            f"{a['retired_at'][:19]} {a['retired_reason']}" if a["retired_at"] else "",
        )
    console.print(table)


@agreement_app.command("show")
def agreement_show(
    agreement_id: Annotated[str, typer.Argument(help="The agreement's id.")],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one agreement with its policy."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.ADMIN) as c:
        row = c.agreement(agreement_id)
    if as_json:
        _echo_json(row)
        return
    _show("agreement", row)


@agreement_app.command("retire")
def agreement_retire(
    agreement_id: Annotated[str, typer.Argument(help="The agreement's id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required; kept in the audit log).")],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retire an agreement early: no new transfers; live ones are terminated and the peer retires its copy."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.ADMIN) as c:
        row = c.retire_agreement(agreement_id, reason)
    if as_json:
        _echo_json(row)
        return
    console.print(f"agreement {row['id']} retired at {row['retired_at']}", highlight=False)


# --- transfers --------------------------------------------------------------------------------------

WaitForTransferOpt = Annotated[
    list[str] | None, typer.Option("--wait-for", help="State(s) --wait waits for (default: the step's).")
]


def _transfer_wait(c: ConnectorClient, pid: str, wanted: list[str], timeout: float) -> dict[str, Any]:
    return _wait(lambda w, t: c.transfer(pid, wait_for=w, timeout_s=t), wanted, _TRANSFER_FINAL, timeout)


@transfer_app.command("start")
def transfer_start(
    agreement_id: Annotated[str, typer.Argument(help="A finalized agreement we hold as consumer.")],
    wait: WaitOpt = False,
    wait_for: WaitForTransferOpt = None,
    timeout: TimeoutOpt = 30.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Consumer: request a compute-to-data transfer; with --wait, until the provider starts it."""
    wanted = (wait_for or ["STARTED"]) if wait else None
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.RESEARCHER, timeout + 30) as c:
        row = c.start_transfer(agreement_id)
        if wanted:
            row = _transfer_wait(c, row["id"], wanted, timeout)
    _finish("transfer", row, wanted, as_json)


@transfer_app.command("list")
def transfer_list(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List transfer processes, both sides."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.ADMIN) as c:
        rows = c.transfers(limit)
    if as_json:
        _echo_json(rows)
        return
    table = Table("id", "role", "state", "counterparty", "agreement", "format", "updated")
    for t in rows:
        table.add_row(
            t["id"],
            t["role"],
            t["state"],
            t["counterparty_id"],
            t["agreement_id"],
            t["format"],
            t["updated_at"][:19],
        )
    console.print(table)


@transfer_app.command("show")
def transfer_show(
    pid: Annotated[str, typer.Argument(help="The transfer's id (our pid).")],
    wait: WaitOpt = False,
    wait_for: WaitForTransferOpt = None,
    timeout: TimeoutOpt = 30.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one transfer (its data address once started); --wait as for `start`."""
    wanted = (wait_for or ["STARTED"]) if wait else None
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.ADMIN, timeout + 30) as c:
        row = _transfer_wait(c, pid, wanted, timeout) if wanted else c.transfer(pid)
    _finish("transfer", row, wanted, as_json)


def _transfer_command(name: str, action: str, state: str, doc: str) -> None:
    def command(
        pid: Annotated[str, typer.Argument(help="The transfer's id (our pid).")],
        reason: ReasonOpt = "",
        wait: WaitOpt = False,
        wait_for: WaitForTransferOpt = None,
        timeout: TimeoutOpt = 30.0,
        url: UrlOpt = None,
        api_key: KeyOpt = None,
        space: SpaceOpt = None,
        as_: AsOpt = None,
        role: RoleOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        wanted = (wait_for or [state]) if wait else None
        with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.ADMIN, timeout + 30) as c:
            row = c.transfer_action(pid, action, reason=reason)
            if wanted:
                row = _transfer_wait(c, pid, wanted, timeout)
        _finish("transfer", row, wanted, as_json)

    command.__doc__ = doc
    transfer_app.command(name)(command)


for _name, _taction, _state, _tdoc in (
    ("suspend", "suspend", "SUSPENDED", "Either side: suspend a started transfer."),
    ("resume", "start", "STARTED", "Resume a suspended transfer (the provider issues a fresh data address)."),
    ("complete", "complete", "COMPLETED", "Either side: complete a transfer."),
    ("terminate", "terminate", "TERMINATED", "Either side: terminate a transfer (--reason tells the peer)."),
):
    _transfer_command(_name, _taction, _state, _tdoc)
