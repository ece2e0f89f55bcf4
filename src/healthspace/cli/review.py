"""`healthspace review`: the provider's output-review airlock, for its stewards and reviewers."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from healthspace.cli.dsp import (
    AsOpt,
    JsonOpt,
    KeyOpt,
    RoleOpt,
    SpaceOpt,
    UrlOpt,
    _conn,
    _echo_json,
    _errors,
    _show,
    console,
)
from healthspace.core.apikeys import Role as StaffRole

__all__ = ["review_app"]

review_app = typer.Typer(
    help="Results held for human output review at this connector: list, show, approve, reject.",
    no_args_is_help=True,
)

ReviewId = Annotated[str, typer.Argument(help="The review's id (from `review list`).")]


@review_app.command("list")
def review_list(
    state: Annotated[
        str, typer.Option("--state", help="HELD (default), RELEASED, REJECTED or all.")
    ] = "HELD",
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List results in the airlock (oldest first), without the results themselves."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.STEWARD) as c:
        rows = c.reviews(state=state, limit=500)
    if as_json:
        _echo_json(rows)
        return
    table = Table("id", "state", "job", "consumer", "scenario", "approvals", "held since", "reason")
    for r in rows:
        table.add_row(
            r["id"],
            r["state"],
            r["job_id"],
            r["consumer_id"],
            r["scenario_id"],
            f"{len(r['approvals'])} of {r['required']}",
            r["created_at"][:19],
            r.get("reason") or "",
        )
    console.print(table)


@review_app.command("show")
def review_show(
    review_id: ReviewId,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one held result with the figures under review (the view is audited)."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.STEWARD) as c:
        row = c.review(review_id)
    if as_json:
        _echo_json(row)
        return
    result = row.pop("result", None)
    _show("review", row)
    if result is not None:
        console.print_json(json.dumps(result.get("payload", {}).get("result", result)))


@review_app.command("approve")
def review_approve(
    review_id: ReviewId,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve a held result; the second distinct approval releases it to the consumer."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.STEWARD) as c:
        row = c.approve_review(review_id)
    if as_json:
        _echo_json(row)
        return
    console.print(f"review {row['id']}: {row['state']} ({len(row['approvals'])} of {row['required']})")


@review_app.command("reject")
def review_reject(
    review_id: ReviewId,
    reason: Annotated[str, typer.Option("--reason", help="Why (required; the consumer sees it).")],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    space: SpaceOpt = None,
    as_: AsOpt = None,
    role: RoleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reject a held result with a reason: final, the result never leaves."""
    with _errors(), _conn(url, api_key, space, as_, role).client(StaffRole.STEWARD) as c:
        row = c.reject_review(review_id, reason)
    if as_json:
        _echo_json(row)
        return
    console.print(f"review {row['id']}: {row['state']}: {row['reason']}")
