"""The authority's cross-border rule set and export approvals on the wire, signed, and a fail-closed cache.

Wire form: a compact JWS (EdDSA, `typ: hs-cross-border+jwt`) signed by the authority, with claims `iss`
(authority id), `iat` (whole seconds), `kind` (`rules` or `approvals`) and either `rules` (jurisdiction →
{home, abroad: {output type → treatment}, basis, safeguards}) or `approvals` (a list of {reference,
dataset_id, consumer_id, scenario_id, expires_at}) with `sub`, the provider they are for. Connectors
verify the signature against the pinned authority key, so a rule set or approval cannot be forged or
edited on its way; `CrossBorderCache` keeps both fresh and refuses to answer when it cannot.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from healthspace.core.clock import Clock, SystemClock
from healthspace.core.errors import ConfigurationError, HealthspaceError
from healthspace.identity.keys import SigningKey, public_key_from_b64
from healthspace.policy.crossborder import ExportApproval, JurisdictionRules, Treatment
from healthspace.policy.vocabulary import OUTPUT_TYPES

__all__ = [
    "CROSS_BORDER_TYP",
    "CrossBorderCache",
    "CrossBorderSet",
    "CrossBorderUnavailableError",
    "InvalidCrossBorderDocumentError",
    "approvals_from_json",
    "approvals_to_json",
    "rules_from_json",
    "rules_to_json",
    "sign_approvals",
    "sign_rules",
    "verify_approvals",
    "verify_rules",
]

log = logging.getLogger(__name__)

CROSS_BORDER_TYP = "hs-cross-border+jwt"
_MAX_TOKEN = 1 << 20


class InvalidCrossBorderDocumentError(HealthspaceError):
    """A rule set or approval list not signed by the pinned authority key, or malformed."""

    status = 502
    code = "cross-border-document-invalid"
    title = "The authority's cross-border rules could not be trusted"


class CrossBorderUnavailableError(HealthspaceError):
    """No trustworthy, fresh rule set or approval list is at hand: cross-border decisions deny."""

    status = 503
    code = "cross-border-unavailable"
    title = "Cross-border rules are unavailable"


# --- JSON form ---------------------------------------------------------------------------------------


def rules_to_json(rules: Mapping[str, JurisdictionRules]) -> dict[str, Any]:
    return {
        code: {
            "home": r.home,
            "abroad": {t: treatment.value for t, treatment in sorted(r.abroad.items())},
            "basis": r.basis,
            "safeguards": list(r.safeguards),
        }
        for code, r in sorted(rules.items())
    }


def _bad(why: str) -> InvalidCrossBorderDocumentError:
    return InvalidCrossBorderDocumentError(f"cross-border document refused: {why}")


def rules_from_json(doc: object) -> dict[str, JurisdictionRules]:
    """The rule set of `rules_to_json`; an unknown output type or treatment is refused, not skipped."""
    if not isinstance(doc, dict):
        raise _bad("rules is not an object")
    out: dict[str, JurisdictionRules] = {}
    for code, r in doc.items():
        if not isinstance(r, dict) or not isinstance(r.get("abroad"), dict):
            raise _bad(f"rule {code!r} is not an object with 'abroad'")
        home, basis, safeguards = r.get("home"), r.get("basis"), r.get("safeguards", [])
        if not isinstance(home, str) or not isinstance(basis, str) or not isinstance(safeguards, list):
            raise _bad(f"rule {code!r} has no home or basis")
        abroad: dict[str, Treatment] = {}
        for output, treatment in r["abroad"].items():
            if output not in OUTPUT_TYPES:
                raise _bad(f"rule {code!r}: unknown output type {output!r}")
            try:
                abroad[output] = Treatment(treatment)
            except ValueError:
                raise _bad(f"rule {code!r}: unknown treatment {treatment!r}") from None
        out[str(code)] = JurisdictionRules(home, abroad, basis, tuple(str(s) for s in safeguards))
    return out


def approvals_to_json(approvals: list[ExportApproval]) -> list[dict[str, str]]:
    return [
        {
            "reference": a.reference,
            "dataset_id": a.dataset_id,
            "consumer_id": a.consumer_id,
            "scenario_id": a.scenario_id,
            "expires_at": a.expires_at.astimezone(UTC).isoformat(),
        }
        for a in approvals
    ]


def approvals_from_json(doc: object) -> list[ExportApproval]:
    if not isinstance(doc, list):
        raise _bad("approvals is not a list")
    out = []
    for a in doc:
        fields = ("reference", "dataset_id", "consumer_id", "scenario_id", "expires_at")
        if not isinstance(a, dict) or not all(isinstance(a.get(f), str) for f in fields):
            raise _bad("an approval lacks one of " + ", ".join(fields))
        try:
            expires = datetime.fromisoformat(a["expires_at"])
        except ValueError:
            raise _bad(f"approval {a['reference']!r} has a bad expiry") from None
        if expires.tzinfo is None:
            raise _bad(f"approval {a['reference']!r} has an expiry without a zone")
        out.append(
            ExportApproval(a["reference"], a["dataset_id"], a["consumer_id"], a["scenario_id"], expires)
        )
    return out


# --- signatures ----------------------------------------------------------------------------------------


def _sign(key: SigningKey, claims: dict[str, Any]) -> str:
    return jwt.encode(
        claims, key.private_key, algorithm="EdDSA", headers={"typ": CROSS_BORDER_TYP, "kid": key.key_id}
    )


def sign_rules(
    key: SigningKey, issuer: str, issued_at: datetime, rules: Mapping[str, JurisdictionRules]
) -> str:
    """The rule set as a JWS signed by the authority."""
    claims = {
        "iss": issuer,
        "iat": int(issued_at.timestamp()),
        "kind": "rules",
        "rules": rules_to_json(rules),
    }
    return _sign(key, claims)


def sign_approvals(
    key: SigningKey, issuer: str, issued_at: datetime, provider_id: str, approvals: list[ExportApproval]
) -> str:
    """The export approvals registered for `provider_id`'s datasets, as a JWS signed by the authority."""
    claims = {
        "iss": issuer,
        "iat": int(issued_at.timestamp()),
        "kind": "approvals",
        "sub": provider_id,
        "approvals": approvals_to_json(approvals),
    }
    return _sign(key, claims)


def _verify(token: object, public_key_b64: str, issuer: str, kind: str) -> tuple[datetime, dict[str, Any]]:
    if not isinstance(token, str) or len(token) > _MAX_TOKEN:
        raise _bad("not a token")
    try:
        if jwt.get_unverified_header(token).get("typ") != CROSS_BORDER_TYP:
            raise _bad("wrong token type")
        claims: dict[str, Any] = jwt.decode(
            token,
            public_key_from_b64(public_key_b64),
            algorithms=["EdDSA"],
            issuer=issuer,
            options={"require": ["iss", "iat"], "verify_iat": False},
        )
    except jwt.PyJWTError as exc:
        raise _bad(f"signature or issuer ({type(exc).__name__})") from None
    if claims.get("kind") != kind or type(claims.get("iat")) is not int:
        raise _bad(f"not a {kind} document")
    return datetime.fromtimestamp(claims["iat"], UTC), claims


def verify_rules(
    token: object, public_key_b64: str, issuer: str
) -> tuple[datetime, dict[str, JurisdictionRules]]:
    """(issued at, rule set) of a rule set signed by `issuer`'s pinned key; raises otherwise."""
    issued_at, claims = _verify(token, public_key_b64, issuer, "rules")
    return issued_at, rules_from_json(claims.get("rules"))


def verify_approvals(
    token: object, public_key_b64: str, issuer: str, provider_id: str
) -> tuple[datetime, list[ExportApproval]]:
    """(issued at, approvals) of an approval list signed by `issuer` for `provider_id`; raises otherwise."""
    issued_at, claims = _verify(token, public_key_b64, issuer, "approvals")
    if claims.get("sub") != provider_id:
        raise _bad("the approvals are for another provider")
    return issued_at, approvals_from_json(claims.get("approvals"))


# --- the connector's cache -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrossBorderSet:
    """What a provider decides cross-border transfers with, and when the authority issued it."""

    rules: Mapping[str, JurisdictionRules]
    approvals: tuple[ExportApproval, ...]
    issued_at: datetime


class CrossBorderCache:
    """Keeps the authority's rule set and this provider's approvals fresh; fails closed.

    `fetch` returns a *verified* `CrossBorderSet` or raises. It is called again once the held set was
    fetched `max_age` ago (0: on every use). A failed fetch keeps the held set until it was issued more
    than `hard_limit` ago; with nothing usable held, `current()` raises `CrossBorderUnavailableError`,
    and every cross-border decision denies. A set older than the one held is refused (a replayed old
    list must not bring back a revoked approval).
    """

    def __init__(
        self,
        fetch: Callable[[], CrossBorderSet],
        *,
        clock: Clock | None = None,
        max_age: timedelta = timedelta(seconds=30),
        hard_limit: timedelta = timedelta(minutes=10),
    ) -> None:
        if max_age < timedelta(0) or hard_limit <= max_age:
            raise ConfigurationError("cross-border cache needs 0 <= max_age < hard_limit")
        self._fetch = fetch
        self._clock: Clock = clock or SystemClock()
        self._max_age = max_age
        self._hard_limit = hard_limit
        self._held: CrossBorderSet | None = None
        self._fetched_at: datetime | None = None
        self._lock = threading.Lock()

    def current(self) -> CrossBorderSet:
        now = self._clock.now()
        with self._lock:
            if self._fetched_at is None or now - self._fetched_at >= self._max_age:
                try:
                    fresh = self._fetch()
                except Exception as exc:  # any failure to fetch: keep what is held, decide below
                    log.warning("cross-border rules fetch failed: %s", type(exc).__name__)
                else:
                    if self._held is None or fresh.issued_at >= self._held.issued_at:
                        self._held, self._fetched_at = fresh, now
                    else:
                        log.warning("refused a cross-border set older than the one held")
            held = self._held
        if held is None:
            raise CrossBorderUnavailableError("no cross-border rules could be fetched from the authority")
        if now - held.issued_at > self._hard_limit:
            raise CrossBorderUnavailableError("the authority's cross-border rules are out of date")
        return held
