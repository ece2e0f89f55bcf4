"""Test kit: a small data space (one authority, two members) and tools to forge tokens by hand."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from healthspace.core.clock import FixedClock
from healthspace.identity.credentials import CredentialClaims, issue_credential
from healthspace.identity.keys import SigningKey
from healthspace.identity.replay import MemoryReplayGuard
from healthspace.identity.tokens import RequestVerifier

AUTHORITY_ID = "gba-health-data-authority"
HOSPITAL_ID = "gz-pearl-river-hospital"
UNIVERSITY_ID = "hk-harbour-university"
START = datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, read independently of the code under test."""
    return dict(json.loads(unb64(token.split(".")[1])))


def header_of(token: str) -> dict[str, Any]:
    return dict(json.loads(unb64(token.split(".")[0])))


def raw_jws(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    """A compact JWS assembled by hand, so tests can build tokens the library would refuse to make."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


class Revocations:
    """A revocation checker the test controls."""

    def __init__(self) -> None:
        self.credentials: set[str] = set()
        self.participants: set[str] = set()
        self.error: Exception | None = None

    def is_revoked(self, credential_id: str, participant_id: str) -> bool:
        if self.error is not None:
            raise self.error
        return credential_id in self.credentials or participant_id in self.participants


@dataclass
class Space:
    """One authority and two members, with credentials issued at START for 365 days."""

    clock: FixedClock
    authority: SigningKey = field(default_factory=SigningKey.generate)
    hospital: SigningKey = field(default_factory=SigningKey.generate)
    university: SigningKey = field(default_factory=SigningKey.generate)
    revocations: Revocations = field(default_factory=Revocations)
    credentials: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.credentials[HOSPITAL_ID] = self.issue(
            HOSPITAL_ID, self.hospital, "hospital", "CN-GD", ["data-provider"]
        )
        self.credentials[UNIVERSITY_ID] = self.issue(
            UNIVERSITY_ID, self.university, "university", "HK", ["data-consumer"]
        )

    def issue(
        self,
        participant_id: str,
        key: SigningKey,
        ptype: str,
        jurisdiction: str,
        roles: list[str],
        *,
        authority: SigningKey | None = None,
        authority_id: str = AUTHORITY_ID,
        now: datetime = START,
        ttl: timedelta = timedelta(days=365),
    ) -> str:
        claims = CredentialClaims(
            participant_id=participant_id,
            legal_name=f"{participant_id} (legal name)",
            participant_type=ptype,
            jurisdiction=jurisdiction,
            roles=roles,
            public_key=key.public_key_b64,
        )
        token, _ = issue_credential(authority or self.authority, authority_id, claims, now, ttl)
        return token

    def verifier(self, audience: str = UNIVERSITY_ID, **kw: Any) -> RequestVerifier:
        return RequestVerifier(
            authority_public_key_b64=self.authority.public_key_b64,
            authority_id=AUTHORITY_ID,
            audience=audience,
            revocations=self.revocations,
            replay=kw.pop("replay", MemoryReplayGuard()),
            clock=self.clock,
            **kw,
        )

    def request_payload(self, **overrides: Any) -> dict[str, Any]:
        """Claims of a well-formed token from the hospital to the university, minted now."""
        iat = int(self.clock.now().timestamp())
        payload: dict[str, Any] = {
            "iss": HOSPITAL_ID,
            "aud": UNIVERSITY_ID,
            "iat": iat,
            "exp": iat + 60,
            "jti": "t-" + str(iat),
            "cred": self.credentials[HOSPITAL_ID],
        }
        payload.update(overrides)
        return payload
