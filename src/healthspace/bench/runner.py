"""Runs benchmark suites and writes their figures as JSON (one file per run, plus `latest.json`)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import platform
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from healthspace.bench import suites
from healthspace.bench.harness import Figure

__all__ = ["available_suites", "run_suites"]


def available_suites() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(suites.__path__) if not m.name.startswith("_"))


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def run_suites(names: list[str], *, quick: bool, out: Path, console: Console) -> int:
    """Run `names` (all when empty). Returns 0, or 1 if a suite failed or an unknown suite was named."""
    known = available_suites()
    unknown = [n for n in names if n not in known]
    if unknown:
        console.print(f"[red]unknown suite(s): {', '.join(unknown)}[/red]; known: {', '.join(known)}")
        return 1
    results: dict[str, list[dict[str, object]]] = {}
    failed: list[str] = []
    table = Table("suite", "figure", "median", "unit", "baseline", "ratio", "target", "met")
    for name in names or known:
        console.print(f"[bold]bench[/bold] {name}{' (quick)' if quick else ''} ...")
        module = importlib.import_module(f"healthspace.bench.suites.{name}")
        try:
            figures: list[Figure] = module.run(quick)
        except Exception as exc:  # a broken suite is reported, the others still run
            console.print(f"[red]suite {name} failed: {exc!r}[/red]")
            failed.append(name)
            continue
        results[name] = [f.to_json() for f in figures]
        for f in figures:
            met = f.meets_target
            table.add_row(
                name,
                f.name,
                _fmt(f.median),
                f.unit,
                f.baseline_name or "-",
                _fmt(f.ratio),
                _fmt(f.target),
                "-" if met is None else ("yes" if met else "[red]no[/red]"),
            )
    console.print(table)
    doc = {
        "time": datetime.now(UTC).isoformat(),
        "quick": quick,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "suites": results,
        "failed": failed,
    }
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(doc, indent=2)
    (out / f"bench-{stamp}.json").write_text(text)
    (out / "latest.json").write_text(text)
    console.print(f"results written to {out / f'bench-{stamp}.json'}")
    return 1 if failed else 0
