"""`healthspace demo --once`: the whole space as separate processes on loopback, checked end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


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
            "300",
            "--data-dir",
            str(tmp_path),
            "--base-port",
            "18700",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
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

    # The university reached an agreement and a started compute-to-data transfer with every hospital ...
    agreed = summary["contracts"]["agreed"]
    assert [(c["negotiation"], c["transfer"]) for c in agreed] == [("FINALIZED", "STARTED")] * 3
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

    # The example study ran at every hospital under its agreement, each charging its privacy budget.
    study = summary["study"]
    assert study["complete"] is True
    assert sorted(study["provenance"]["sites"]) == sorted(c["provider"] for c in agreed)
    assert all(site["epsilon_spent"] == 0.5 for site in study["sites"])
    assert study["combined"]["t2d_patients"]["count"] >= 0

    space = json.loads((tmp_path / "space.json").read_text())
    hospitals = [p for p in space["participants"] if p["type"] == "hospital"]
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
            "18760",
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
