"""`healthspace policy`: check a policy against the health ODRL profile; build one from a template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from healthspace.core.errors import HealthspaceError

__all__ = ["policy_app"]

policy_app = typer.Typer(
    help="Check usage policies against the health ODRL profile; build them from templates.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)


@policy_app.command("check")
def check(policy_file: Annotated[Path, typer.Argument(help="An ODRL policy (compact JSON).")]) -> None:
    """Exit 0 when the policy conforms; otherwise list every problem with its JSON pointer and exit 1."""
    from healthspace.policy import check_policy

    try:
        doc = json.loads(policy_file.read_text())
    except FileNotFoundError:
        err.print(f"[red]error:[/red] no such file: {policy_file}")
        raise typer.Exit(2) from None
    except json.JSONDecodeError as exc:
        err.print(f"[red]error:[/red] {policy_file} is not JSON: {exc}")
        raise typer.Exit(1) from None
    problems = check_policy(doc)
    if not problems:
        console.print(f"{policy_file}: conforms to the health ODRL profile")
        return
    for p in problems:
        console.print(f"{p.pointer or '/'}: {p.message}", soft_wrap=True, markup=False)
    raise typer.Exit(1)


@policy_app.command("template")
def make_template(
    name: Annotated[str, typer.Argument(help="aggregate-research, deidentified-extract or federated-model")],
    scenario: Annotated[str, typer.Option(help="The registered usage scenario the policy is for.")],
    k: Annotated[int | None, typer.Option(help="Minimum cell size / anonymisation level.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Total privacy budget ε.")] = None,
    no_budget: Annotated[
        bool,
        typer.Option(
            "--no-budget",
            help="federated-model only: no privacy budget, so models without a DP release (GLMs) may run "
            "under the provider's disclosure checks.",
        ),
    ] = False,
    days: Annotated[int | None, typer.Option(help="Valid for this many days from the agreement.")] = None,
    target: Annotated[str | None, typer.Option(help="The dataset the offer is for.")] = None,
    assigner: Annotated[str | None, typer.Option(help="The provider's participant id.")] = None,
) -> None:
    """Print a profile-conforming offer built from a named template."""
    from healthspace.policy.templates import template

    params: dict[str, Any] = {"scenario": scenario}
    for key, value in (("k", k), ("epsilon", epsilon), ("valid_for_days", days)):
        if value is not None:
            params[key] = value
    if no_budget:
        if name != "federated-model" or epsilon is not None:
            err.print("[red]error:[/red] --no-budget applies to federated-model, without --epsilon")
            raise typer.Exit(1)
        params["epsilon"] = None
    try:
        policy = template(name, target=target, assigner=assigner, **params)
    except HealthspaceError as exc:
        err.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(1) from None
    console.print_json(json.dumps(policy))
