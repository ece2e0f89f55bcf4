"""`healthspace connector serve --workers N`: one connector as several processes on one PostgreSQL
database, served on one port, next to a connector served in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from healthspace.audit.log import verify_database
from healthspace.cli.main import app
from healthspace.core.apikeys import Role
from healthspace.core.db import Database
from healthspace.core.leases import Leases
from healthspace.policy import template
from tests.conftest import temporary_postgres_database
from tests.support.space import PARTICIPANTS, running_space

GZ, HKU = "gz-hospital", "hk-university"
OFFER = template("aggregate-research", scenario="diabetes-outcomes-research", epsilon=3.0)
DATASET = "urn:dataset:workers"


def _until(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextmanager
def _served_by_workers(data_dir: Path, url: str, database_url: str, workers: int) -> Iterator[None]:
    port = url.rsplit(":", 1)[1]
    env = {**os.environ, "HEALTHSPACE_DATABASE_URL": database_url, "HEALTHSPACE_REVOCATION_MAX_AGE_S": "0"}
    args = ["connector", "serve", "--data-dir", str(data_dir), "--port", port, "--workers", str(workers)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "healthspace", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stderr is not None

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"connector serve exited {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _until(up, "the workers to serve")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)  # the supervisor stops its workers, which stop gracefully
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            proc.stderr.close()


def _listening(db: Database) -> int:
    with db.session() as s:
        return int(
            s.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE 'LISTEN healthspace_changes%'"
                )
            )
            or 0
        )


def _negotiate(consumer: httpx.Client, provider_url: str) -> str:
    r = consumer.post(
        "/management/negotiations",
        json={"provider_url": provider_url, "provider_id": GZ, "offer": {**OFFER, "target": DATASET}},
    )
    assert r.status_code == 201, r.text
    done = consumer.get(
        f"/management/negotiations/{r.json()['id']}", params={"wait_for": "FINALIZED", "timeout_s": 30}
    )
    assert done.status_code == 200, done.text
    return f"{done.json()['state']} {done.json().get('terminal_reason') or ''}".strip()


@pytest.mark.postgres
def test_a_connector_served_by_two_workers_negotiates_and_keeps_one_housekeeper(
    tmp_path: Path, postgres_admin_url: str
) -> None:
    with (
        temporary_postgres_database(postgres_admin_url) as gz_database,
        running_space(tmp_path, PARTICIPANTS, database_url={GZ: gz_database}.get, not_served={GZ}) as space,
    ):
        gz = space.connectors[GZ]
        with _served_by_workers(gz.data_dir, gz.url, gz_database, workers=2):
            db = Database(gz_database)
            leases = Leases(db)
            try:
                _until(lambda: len(leases.live_instances()) == 2, "both workers' heartbeats")
                first = leases.live_instances()
                _until(lambda: leases.holder("data.retention") is not None, "a retention runner")
                assert leases.holder("data.retention") in first  # one of them, for both
                # Each worker listens for the others' change notices (long polls see their commits).
                _until(lambda: _listening(db) == 2, "both workers listening for change notices")
                # What an operator sees: the live workers and who does each duty (admins only).
                admin = {"X-API-Key": gz.keys[Role.ADMIN]}
                seen = httpx.get(f"{gz.url}/management/processes", headers=admin).json()
                assert (set(seen["live"]), seen["this"] in first) == (first, True)
                assert seen["duties"] == {"data.retention": leases.holder("data.retention")}
                steward_only = {"X-API-Key": gz.keys[Role.STEWARD]}
                assert httpx.get(f"{gz.url}/management/processes", headers=steward_only).status_code == 403

                steward = httpx.Client(base_url=gz.url, headers={"X-API-Key": gz.keys[Role.STEWARD]})
                researcher = httpx.Client(
                    base_url=space.connectors[HKU].url,
                    headers={"X-API-Key": space.connectors[HKU].keys[Role.RESEARCHER]},
                    timeout=60,
                )
                with steward, researcher:
                    r = steward.post(
                        "/management/datasets", json={"id": DATASET, "title": "Workers", "offer": OFFER}
                    )
                    assert r.status_code == 201, r.text
                    with ThreadPoolExecutor(6) as pool:
                        states = list(pool.map(lambda _: _negotiate(researcher, gz.url), range(12)))
                    assert states == ["FINALIZED"] * 12

                    # A worker killed outright is replaced by the supervisor; the connector goes on.
                    victim = sorted(first)[0]
                    os.kill(int(victim.split(":")[1]), signal.SIGKILL)
                    _until(lambda: len(leases.live_instances() - first) == 1, "a replacement worker")
                    assert _negotiate(researcher, gz.url) == "FINALIZED"
                    me = httpx.get(f"{gz.url}/.well-known/healthspace").json()
            finally:
                db.dispose()
        db = Database(gz_database)
        try:
            # Stopped gracefully: every worker gave its leases up (the killed one's runs out by
            # itself: nobody waits for that here).
            assert Leases(db).live_instances() <= {victim}
            assert Leases(db).holder("data.retention") in (None, victim)
            # All processes wrote one audit log: it verifies, and its last entries are under a head.
            report = verify_database(db, {me["key_id"]: me["public_key"]})
            assert report.ok, report.reason
            assert report.entries >= 13 * 4  # at least the provider's entries of 13 negotiations
        finally:
            db.dispose()


def test_workers_need_a_postgresql_control_plane(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["connector", "serve", "--data-dir", str(tmp_path), "--workers", "2"],
        env={"HEALTHSPACE_DATABASE_URL": ""},
    )
    assert result.exit_code == 1
    assert "PostgreSQL" in result.output
