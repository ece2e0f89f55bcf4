"""Cost of authenticating a peer call: request token mint + full verification, against raw Ed25519."""

from __future__ import annotations

from datetime import timedelta

from healthspace.bench.harness import Figure, rate
from healthspace.core.clock import SystemClock
from healthspace.identity.credentials import (
    CredentialClaims,
    ParticipantRole,
    ParticipantType,
    issue_credential,
)
from healthspace.identity.keys import SigningKey
from healthspace.identity.replay import MemoryReplayGuard
from healthspace.identity.revocation import RevocationCache, RevocationList
from healthspace.identity.tokens import RequestVerifier, mint_request_token

__all__ = ["run"]

AUTHORITY_ID = "bench-authority"
CALLER_ID = "bench-hospital"
AUDIENCE = "bench-university"
# The issue sets no figure; 1,000 authenticated calls per second on one core keeps authentication
# under 1 ms of a call, far below the cost of the work a peer call asks for.
TARGET_OPS = 1000.0


def run(quick: bool) -> list[Figure]:
    ops, repeat = (200, 3) if quick else (2000, 7)
    clock = SystemClock()
    authority, caller = SigningKey.generate(), SigningKey.generate()
    claims = CredentialClaims(
        participant_id=CALLER_ID,
        legal_name="Bench Hospital",
        participant_type=ParticipantType.HOSPITAL,
        jurisdiction="CN-GD",
        roles=(ParticipantRole.DATA_PROVIDER,),
        public_key=caller.public_key_b64,
    )
    credential, _ = issue_credential(authority, AUTHORITY_ID, claims, clock.now(), timedelta(days=1))
    revocations = RevocationList(issuer=AUTHORITY_ID, issued_at=clock.now())
    verifier = RequestVerifier(
        authority_public_key_b64=authority.public_key_b64,
        authority_id=AUTHORITY_ID,
        audience=AUDIENCE,
        revocations=RevocationCache(lambda: revocations, clock=clock, max_age=timedelta(seconds=60)),
        replay=MemoryReplayGuard(),
        clock=clock,
    )
    # The baseline signs and verifies exactly the bytes a request token signs.
    sample = mint_request_token(caller, credential, CALLER_ID, AUDIENCE, clock.now())
    signing_input = sample.rsplit(".", 1)[0].encode()
    public = caller.public_key

    def full_path() -> None:
        for _ in range(ops):
            token = mint_request_token(caller, credential, CALLER_ID, AUDIENCE, clock.now())
            verifier.verify(f"Bearer {token}")

    def raw_sign_verify() -> None:
        for _ in range(ops):
            public.verify(caller.sign(signing_input), signing_input)

    # Verification alone is what a receiving connector pays per request. Tokens for every run
    # (warm-up included) are minted beforehand, outside the timed calls.
    batches = [
        [
            f"Bearer {mint_request_token(caller, credential, CALLER_ID, AUDIENCE, clock.now())}"
            for _ in range(ops)
        ]
        for _ in range(repeat + 1)
    ]

    def verify_only() -> None:
        for header in batches.pop():
            verifier.verify(header)

    signature = caller.sign(signing_input)

    def raw_verify() -> None:
        for _ in range(ops):
            public.verify(signature, signing_input)

    full = rate(full_path, ops, repeat=repeat)
    baseline = rate(raw_sign_verify, ops, repeat=repeat)
    verify_rates = rate(verify_only, ops, repeat=repeat)
    return [
        Figure(
            name="request token mint+verify (full verifier, memory replay guard)",
            unit="ops/s",
            samples=full,
            baseline_name="raw Ed25519 sign+verify of the same bytes",
            baseline_samples=baseline,
            target=TARGET_OPS,
            note="verifier: header parse, alg/typ, cached credential, signature, claims, revocation "
            "cache, replay guard",
        ),
        Figure(
            name="request token verify only (receiver's cost)",
            unit="ops/s",
            samples=verify_rates,
            baseline_name="raw Ed25519 verify of the same bytes",
            baseline_samples=rate(raw_verify, ops, repeat=repeat),
            target=TARGET_OPS,
            note="tokens minted before the timed runs",
        ),
    ]
