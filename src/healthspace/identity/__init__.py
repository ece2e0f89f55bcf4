"""Identity and trust: Ed25519 keys, membership credentials, signed request tokens, replay and revocation.

    keys.py         SigningKey (encrypted at rest), public_key_from_b64, verify_signature
    credentials.py  ParticipantType, ParticipantRole, CredentialClaims, issue/verify_credential
    tokens.py       mint_request_token, RequestVerifier -> Caller
    replay.py       ReplayGuard: MemoryReplayGuard, SqlReplayGuard (table identity_seen_tokens)
    revocation.py   RevocationList, sign/verify_revocation_list, RevocationCache (fails closed)
    fastapi.py      peer_dependency (FastAPI) and PeerAuth (httpx)
    errors.py       Reason codes, TokenRejectedError (401), MembershipDeniedError (403)

Design and threat model: docs/adr/0002-identity-and-tokens.md.
"""
