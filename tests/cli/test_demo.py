"""`healthspace demo --once`: the whole space as separate processes on loopback, checked end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from healthspace.cli.demo import AGE_BREAKS, HBA1C_BANDS
from healthspace.synth import OUTCOME_COEFFICIENTS
from tests.support.dp import laplace_noise_bound

# Labels as the spec makes them: bands [lo, hi), then 'other'.
AGE_LABELS = ["18-45", "45-65", "65-120", "other"]
BAND_LABELS = ["4-6.5", "6.5-7", "7-8", "8-9", "9-10", "10-15", "other"]


SCENARIO = "diabetes-outcomes-research"
PATIENTS = 2000  # per hospital: enough deaths at each for the model's disclosure checks (no empty cell)
EPS_PER_RELEASE = 0.5  # the demo study's ε 1.5 split over its three DP releases


def truth(synth: Path, at: datetime) -> dict[str, Any]:
    """Ground truth for one hospital from its synthetic OMOP export, with the consent rule of
    docs/synth.md (a permit decided by `at`, not withdrawn by then), computed in pandas.

    The index date is the first HbA1c test (the index visit); `persons` are consenting persons with
    one, `t2d` those of them with a type 2 diabetes code, with sex, age band and index HbA1c band.
    """
    omop = synth / "omop"
    read = lambda t: pq.read_table(omop / f"{t}.parquet").to_pandas()  # noqa: E731
    c = read("consent")
    c = c[(c.scenario_id == SCENARIO) & (c.decision == "permit") & (c.decided_at <= at)]
    consenting = set(c[c.withdrawn_at.isna() | (c.withdrawn_at > at)].person_id)
    m = read("measurement")
    m = m[(m.measurement_source_value == "4548-4") & m.value_as_number.notna()]
    m = m.sort_values(["person_id", "measurement_date", "measurement_id"]).groupby("person_id").first()
    person = read("person").set_index("person_id")
    df = person.join(m[["measurement_date", "value_as_number"]], how="inner")
    df = df[df.index.isin(consenting)]
    birth = pd.to_datetime(dict(year=df.year_of_birth, month=df.month_of_birth, day=df.day_of_birth))
    df["age"] = (pd.to_datetime(df.measurement_date) - birth).dt.days / 365.25
    df["sex"] = np.where(df.gender_concept_id == 8507, "male", "female")
    df["age_band"] = pd.cut(df.age, AGE_BREAKS, right=False, labels=AGE_LABELS[:-1]).astype(object)
    df["age_band"] = df.age_band.fillna("other")
    band = pd.cut(df.value_as_number, HBA1C_BANDS, right=False, labels=BAND_LABELS[:-1]).astype(object)
    df["band"] = band.fillna("other")
    cond = read("condition_occurrence")
    t2d_ids = set(cond.loc[cond.condition_source_value.str.startswith("E11"), "person_id"])
    every_t2d = len(t2d_ids & set(df.index)) + len(t2d_ids & (set(person.index) - consenting))
    return {
        "consenting": len(consenting),
        "persons": df,
        "t2d": df[df.index.isin(t2d_ids)],
        "every_t2d": every_t2d,
    }


def within(published: int | None, true: int, bound: int, k: int = 10) -> bool:
    """A DP release of `true`: published within the noise bound, or hidden (noisy value 1..k-1)."""
    return true <= k - 1 + bound if published is None else abs(published - true) <= bound


def _base_port(offset: int) -> int:
    # Per test process: the demo skips ports in use, but two test runs on one machine probing the
    # same range at once can both find a port free and then collide.
    return 20000 + (os.getpid() % 600) * 20 + offset  # below the ephemeral range (32768-)


@pytest.mark.slow
def test_demo_once_starts_the_space_and_its_self_check_passes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "healthspace",
            "demo",
            "--once",
            "--patients",
            str(PATIENTS),
            "--data-dir",
            str(tmp_path),
            "--base-port",
            str(_base_port(0)),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The readable tables come first, then the JSON summary.
    assert "logistic regression of death during follow-up" in proc.stdout
    assert "HbA1c at the index visit" in proc.stdout
    summary = json.loads(proc.stdout[proc.stdout.index("\n{\n") :])
    assert summary["ok"] is True
    check = summary["self_check"]
    # 4 connectors, each to the 3 others, both directions proven.
    assert len(check["trust"]) == 12
    assert all(t["mutual"] for t in check["trust"])
    assert set(check["audit"]) == {
        "gba-health-data-authority",
        "gz-pearl-river-hospital",
        "sz-bay-medical-centre",
        "hk-harbour-hospital",
        "hk-harbour-university",
    }
    assert all(a["valid"] and a["entries"] > 0 for a in check["audit"].values())

    # The university reached an agreement and a started compute-to-data transfer with every hospital,
    # for the aggregate dataset and for the model dataset ...
    agreed = summary["contracts"]["agreed"]
    assert [(c["negotiation"], c["transfer"]) for c in agreed] == [("FINALIZED", "STARTED")] * 6
    assert sorted(c["dataset"].rsplit(":", 1)[1] for c in agreed) == ["t2d-cohort"] * 3 + ["t2d-model"] * 3
    # ... the mainland hospitals' model datasets under registered export approvals ...
    approved = summary["contracts"]["export_approvals"]
    assert sorted(a["provider"] for a in approved) == ["gz-pearl-river-hospital", "sz-bay-medical-centre"]
    # ... and a request for more than the offer allows was refused with the reason.
    refused = summary["contracts"]["refused"]
    assert refused["negotiation"] == "TERMINATED"
    assert "output type" in refused["reason"]
    # The provider audited both decisions with their reasons.
    outcomes = {(d["outcome"], d["check"]) for d in summary["contracts"]["decisions"]}
    assert {
        ("allowed", "contract"),
        ("allowed", "transfer-start"),
        ("denied", "request-within-offer"),
    } <= outcomes
    assert all(d["reasons"] for d in summary["contracts"]["decisions"])

    space = json.loads((tmp_path / "space.json").read_text())
    hospitals = [p for p in space["participants"] if p["type"] == "hospital"]
    at = datetime.now(UTC)
    truths = {p["id"]: truth(Path(p["population"]["synth"]), at) for p in hospitals}
    for p in hospitals:
        # Our consent rule reproduces the connector's consent registry exactly.
        assert truths[p["id"]]["consenting"] == p["population"]["consenting"][SCENARIO]

    # The example study ran at every hospital under its agreement, each charging its privacy budget.
    study = summary["study"]
    assert study["complete"] is True
    assert sorted(study["provenance"]["sites"]) == sorted(p["id"] for p in hospitals)
    assert all(site["epsilon_spent"] == 1.5 for site in study["sites"])
    one = laplace_noise_bound(EPS_PER_RELEASE)  # P(|noise| > one) < 1e-9 for one release
    for site in study["sites"]:
        t2d, got = truths[site["site"]]["t2d"], site["analyses"]
        assert within(got["t2d_patients"]["count"], len(t2d), one)
        table = pd.crosstab(t2d.sex, t2d.age_band)
        for i, sex in enumerate(["female", "male"]):
            for j, band in enumerate(AGE_LABELS):
                true = int(table.loc[sex, band]) if band in table.columns else 0
                assert within(got["by_sex_and_age"]["counts"][i][j], true, one)
        hist = got["hba1c_by_sex_and_age"]
        assert hist["bands"] == BAND_LABELS
        for b, band in enumerate(BAND_LABELS):
            for i, sex in enumerate(["female", "male", "other"]):
                for j, age in enumerate(AGE_LABELS):
                    true = int(((t2d.band == band) & (t2d.sex == sex) & (t2d.age_band == age)).sum())
                    assert within(hist["counts"][b][i][j], true, one), (site["site"], band, sex, age)
            # a band total sums the unclamped noise of its 3 x 4 strata
            assert within(
                hist["band_totals"][b], int((t2d.band == band).sum()), laplace_noise_bound(0.5, terms=12)
            )

    # Combined across the three hospitals: the noise of three releases, against the consented truth,
    # which is further from the truth without the consent filter than the noise can reach.
    combined = study["combined"]
    three = laplace_noise_bound(EPS_PER_RELEASE, terms=3)
    consented = sum(len(t["t2d"]) for t in truths.values())
    assert sum(t["every_t2d"] for t in truths.values()) - consented > 2 * three
    assert combined["t2d_patients"]["exact"] is True
    assert abs(combined["t2d_patients"]["count"] - consented) <= three
    hist = combined["hba1c_by_sex_and_age"]
    for b in range(len(BAND_LABELS)):
        for i in range(3):
            for j in range(len(AGE_LABELS)):
                shown = [s["analyses"]["hba1c_by_sex_and_age"]["counts"][b][i][j] for s in study["sites"]]
                shown = [v for v in shown if v is not None]
                assert hist["counts"][b][i][j] == (sum(shown) if shown else None)

    # The logistic regression of death: fitted at every hospital's rows, and since the demo's data come
    # from the generator, its coefficients are the generator's within 3 standard errors.
    model = summary["model"]
    assert model["ok"] is True
    assert model["converged"] is True
    assert model["site_rows"] == {h: len(t["persons"]) for h, t in truths.items()}
    assert model["n"] == sum(model["site_rows"].values())
    z = {t["term"]: (t["coef"] - t["generator"]) / t["se"] for t in model["terms"]}
    assert all(abs(v) < 3 for v in z.values()), z
    assert [t["generator"] for t in model["terms"]] == [
        OUTCOME_COEFFICIENTS[k]
        for k in ("intercept", "age_per_10y", "male", "hba1c_per_pct", "ckd", "ihd", "copd")
    ]

    assert sorted(p["jurisdiction"] for p in hospitals) == ["CN-GD", "CN-GD", "HK"]
    for p in space["participants"]:
        assert set(p["api_keys"]) == {"admin", "steward", "researcher", "reviewer", "regulator"}
        assert Path(p["identity"]["credential"]).is_file()
    for p in hospitals:
        population = p["population"]
        assert (Path(population["synth"]) / "manifest.json").is_file()
        assert population["dataset"] == f"{p['id']}-ehr"
        # Loaded through validation into the encrypted store: the synthetic data conforms to the standard.
        assert population["ingest"]["inserted"] > 0
        assert population["ingest"]["rejected"] == 0
        assert 0 < population["quality"]["score"] <= 1
        # Consent was imported: each scenario may use some patients, never more than exist.
        assert all(0 < n <= population["patients"] for n in population["consenting"].values())
    # The demo stopped every service it started: nothing answers on its ports any more.
    import httpx

    for p in space["participants"]:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{p['url']}/health", timeout=1)


@pytest.mark.slow
def test_ctrl_c_stops_the_interactive_demo_and_every_service(tmp_path: Path) -> None:
    import signal
    import time

    import httpx

    log = (tmp_path / "demo.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "healthspace",
            "demo",
            "--patients",
            "150",
            "--data-dir",
            str(tmp_path / "d"),
            "--base-port",
            str(_base_port(10)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C" not in (tmp_path / "demo.log").read_text():
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo did not come up in time"
            time.sleep(0.2)
        space = json.loads((tmp_path / "d" / "space.json").read_text())
        urls = [space["authority"]["url"]] + [p["url"] for p in space["participants"]]
        assert all(httpx.get(f"{u}/health").status_code == 200 for u in urls)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    for u in urls:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{u}/health", timeout=1)
