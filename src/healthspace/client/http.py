"""Thin typed clients of the authority's and the connector's management APIs."""

from __future__ import annotations

from typing import Any, Self

import httpx

__all__ = ["ApiError", "AuthorityClient", "ConnectorClient"]


class ApiError(Exception):
    """A service answered with an error; carries its problem document."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(f"HTTP {status}: {problem.get('detail') or problem.get('title') or problem}")


class _Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 10.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self._http.request(method, path, **kwargs)
        if r.is_error:
            try:
                problem = r.json()
            except ValueError:
                problem = {"detail": r.text[:500]}
            raise ApiError(r.status_code, problem if isinstance(problem, dict) else {"detail": problem})
        return r.json()

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/health")
        return result

    def tree_head(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/audit/tree-head")
        return result

    def audit_entries(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Audit log items `{index, leaf_hash, entry}` with start <= index < stop, fetched page by page.

        Each item, encoded with sorted keys, is a line of the offline export format (`audit verify`).
        """
        out: list[dict[str, Any]] = []
        while start < stop:
            params = {"start": start, "stop": min(stop, start + 1000)}
            page = self._call("GET", "/audit/entries", params=params)
            if not page["entries"]:
                break
            out += page["entries"]
            start = page["stop"]
        return out


class AuthorityClient(_Client):
    def describe(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/.well-known/healthspace-authority")
        return result

    def onboard(self, participant: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/admin/participants", json=participant)
        return result

    def participants(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/admin/participants")
        return result

    def revoke(self, participant_id: str, reason: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", f"/admin/participants/{participant_id}/revoke", json={"reason": reason}
        )
        return result

    def register_scenario(self, scenario: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/admin/scenarios", json=scenario)
        return result

    def scenarios(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/scenarios")
        return result

    def register_export_approval(self, approval: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/admin/export-approvals", json=approval)
        return result

    def publish_standard(self, standard: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/admin/standards", json=standard)
        return result


class ConnectorClient(_Client):
    def describe(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/.well-known/healthspace")
        return result

    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/management/whoami")
        return result

    def trust_check(self, url: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/management/trust-check", json={"url": url})
        return result

    # --- data offers and contracts (DSP, through the management API) ---

    def publish_dataset(self, dataset: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/management/datasets", json=dataset)
        return result

    def query_catalog(self, url: str, filter_: list[Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"url": url}
        if filter_ is not None:
            body["filter"] = filter_
        result: dict[str, Any] = self._call("POST", "/management/catalog/query", json=body)
        return result

    def start_negotiation(self, provider_url: str, offer: dict[str, Any]) -> dict[str, Any]:
        body = {"provider_url": provider_url, "offer": offer}
        result: dict[str, Any] = self._call("POST", "/management/negotiations", json=body)
        return result

    def negotiation(
        self,
        pid: str,
        wait_for: list[str] | None = None,
        timeout_s: float = 10,
        *,
        acknowledged: bool = False,
    ) -> dict[str, Any]:
        """A negotiation; with `wait_for` (states) and/or `acknowledged` (both sides' pids known),
        long-polls until that holds or the negotiation is final."""
        params: dict[str, Any] = {"timeout_s": timeout_s} if wait_for or acknowledged else {}
        if wait_for:
            params["wait_for"] = wait_for
        if acknowledged:
            params["acknowledged"] = True
        result: dict[str, Any] = self._call("GET", f"/management/negotiations/{pid}", params=params)
        return result

    def start_transfer(self, agreement_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", "/management/transfers", json={"agreement_id": agreement_id}
        )
        return result

    def transfer(self, pid: str, wait_for: list[str] | None = None, timeout_s: float = 10) -> dict[str, Any]:
        params: dict[str, Any] = {"wait_for": wait_for, "timeout_s": timeout_s} if wait_for else {}
        result: dict[str, Any] = self._call("GET", f"/management/transfers/{pid}", params=params)
        return result

    # --- consent (hospitals) ---

    def import_consents(self, ndjson: bytes) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/management/consent/import", content=ndjson)
        return result

    def consent_cohort(self, scenario_id: str, data_classes: list[str]) -> int:
        params = {"scenario_id": scenario_id, "data_class": data_classes}
        return int(self._call("GET", "/management/consent/cohort", params=params)["patients"])

    # --- DSP management beyond the basics (datasets, processes, agreements) ---

    def datasets(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/management/datasets")
        return result

    def request_offer(
        self,
        provider_url: str,
        offer: dict[str, Any],
        *,
        provider_id: str | None = None,
        auto: bool = True,
    ) -> dict[str, Any]:
        """Start a negotiation; `auto=False` leaves accepting offers and verifying to a researcher."""
        body: dict[str, Any] = {"provider_url": provider_url, "offer": offer, "auto": auto}
        if provider_id is not None:
            body["provider_id"] = provider_id
        result: dict[str, Any] = self._call("POST", "/management/negotiations", json=body)
        return result

    def offer_to(
        self,
        consumer_url: str,
        dataset_id: str,
        offer: dict[str, Any] | None = None,
        *,
        consumer_id: str | None = None,
    ) -> dict[str, Any]:
        """Provider: begin a negotiation by offering a dataset (its own offer, or a narrower one)."""
        body: dict[str, Any] = {"consumer_url": consumer_url, "dataset_id": dataset_id, "offer": offer}
        if consumer_id is not None:
            body["consumer_id"] = consumer_id
        result: dict[str, Any] = self._call("POST", "/management/negotiations/offers", json=body)
        return result

    def negotiations(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        params = {"limit": limit, "offset": offset}
        result: list[dict[str, Any]] = self._call("GET", "/management/negotiations", params=params)
        return result

    def negotiation_action(
        self, pid: str, action: str, *, reason: str = "", offer: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """accept, verify, request (counter-request), approve, offer (counter-offer), finalize, reject,
        terminate; the connector checks the caller's role and the process's state."""
        body: dict[str, Any] = {"reason": reason}
        if offer is not None:
            body["offer"] = offer
        result: dict[str, Any] = self._call("POST", f"/management/negotiations/{pid}/{action}", json=body)
        return result

    def agreements(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/management/agreements")
        return result

    def agreement(self, agreement_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/management/agreements/{agreement_id}")
        return result

    def retire_agreement(self, agreement_id: str, reason: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", f"/management/agreements/{agreement_id}/retire", json={"reason": reason}
        )
        return result

    def transfers(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        params = {"limit": limit, "offset": offset}
        result: list[dict[str, Any]] = self._call("GET", "/management/transfers", params=params)
        return result

    def transfer_action(self, pid: str, action: str, *, reason: str = "") -> dict[str, Any]:
        """start (or resume), suspend, complete, terminate."""
        result: dict[str, Any] = self._call(
            "POST", f"/management/transfers/{pid}/{action}", json={"reason": reason}
        )
        return result

    # --- output review (management API) ---

    def reviews(self, state: str = "HELD", limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Results in the provider's output-review airlock; `state` HELD, RELEASED, REJECTED or all."""
        params = {"state": state, "limit": limit, "offset": offset}
        result: list[dict[str, Any]] = self._call("GET", "/management/reviews", params=params)
        return result

    def review(self, review_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/management/reviews/{review_id}")
        return result

    def approve_review(self, review_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/management/reviews/{review_id}/approve")
        return result

    def reject_review(self, review_id: str, reason: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", f"/management/reviews/{review_id}/reject", json={"reason": reason}
        )
        return result

    # --- clinical data (management API) ---

    def create_dataset(self, dataset_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", "/management/data/datasets", json={"dataset_id": dataset_id}
        )
        return result

    def ingest(
        self, dataset_id: str, paths: list[str], source_system: str, standard: str | None = None
    ) -> list[dict[str, Any]]:
        """Ingest files from the connector's import directory (paths relative to it), one batch,
        validated against `standard` as the authority publishes it (default: the built-in one)."""
        body = {"paths": paths, "source_system": source_system, "standard": standard}
        result: list[dict[str, Any]] = self._call(
            "POST", f"/management/data/datasets/{dataset_id}/ingest", json=body
        )
        return result

    def quality(self, dataset_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/management/data/datasets/{dataset_id}/quality")
        return result

    def move_dataset(self, dataset_id: str, target: str, reason: str = "") -> dict[str, Any]:
        body = {"target": target, "reason": reason}
        result: dict[str, Any] = self._call(
            "POST", f"/management/data/datasets/{dataset_id}/moves", json=body
        )
        return result
