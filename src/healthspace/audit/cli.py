"""The `healthspace audit` commands: verify an exported log offline, export a log from its database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from healthspace.audit.log import export_database
from healthspace.audit.models import SignedTreeHead
from healthspace.audit.verify import KEY_FILE, load_head, load_public_key, verify_export
from healthspace.core.db import Database
from healthspace.core.errors import HealthspaceError

__all__ = ["audit_app"]

audit_app = typer.Typer(
    help="Tamper-evident audit log: verify exports offline, export from a database.", no_args_is_help=True
)


@audit_app.command("verify")
def verify_command(
    export: Annotated[Path, typer.Argument(help="export directory (entries.jsonl, tree-head.json, ...)")],
    head: Annotated[Path | None, typer.Option(help="signed tree head JSON from a trusted source")] = None,
    public_key: Annotated[
        str | None,
        typer.Option(
            help="signer's public key (URL-safe base64) or a file holding it; default: the export's own"
        ),
    ] = None,
) -> None:
    """Check every entry of an export against a signed tree head. Exit 0 when valid, 1 when not."""
    try:
        signed: SignedTreeHead | None = load_head(head) if head is not None else None
        key = load_public_key(public_key) if public_key is not None else None
        if key is None:
            typer.echo(
                f"note: using the export's own {KEY_FILE}; this shows the export is consistent, "
                f"not who signed it. Pass --public-key from a trusted source.",
                err=True,
            )
        report = verify_export(export, signed, key)
    except (HealthspaceError, OSError) as exc:
        typer.echo(f"error: {getattr(exc, 'detail', exc)}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("export")
def export_command(
    database_url: Annotated[str, typer.Option(help="URL of the service's control-plane database")],
    out: Annotated[Path, typer.Option(help="directory to write the export into")],
) -> None:
    """Export the entries covered by the newest signed tree head (no signing key needed).

    Entries appended after that head are left out; a running service signs a fresh head on
    GET /audit/tree-head.
    """
    db = Database(database_url, branches=["audit"])
    try:
        head = export_database(db, out)
    except HealthspaceError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(2) from exc
    finally:
        db.dispose()
    typer.echo(
        f"exported {head.tree_size} entries and the tree head of {head.timestamp.isoformat()} to {out}"
    )
