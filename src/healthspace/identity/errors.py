"""Why a peer was refused: stable reason codes and the typed errors that carry them.

Every refusal is an `AuthenticationError` (401) or a `ForbiddenError` (403) from `core.errors`, so the
problem handlers answer it as JSON. The reason code travels in `error.extra["reason"]` (and in the
problem document as `reason`) and as the attribute `error.reason`, for the caller's audit entry.
Messages never contain the token, a key or any other secret.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from healthspace.core.errors import AuthenticationError, ForbiddenError

__all__ = ["MembershipDeniedError", "Reason", "TokenRejectedError", "reject"]


class Reason(StrEnum):
    """Stable codes for each way a token or credential can fail. Never rename one: audits store them."""

    TOKEN_MISSING = "token-missing"  # noqa: S105 - a reason code, not a secret
    NOT_BEARER = "not-bearer"
    TOKEN_MALFORMED = "token-malformed"  # noqa: S105 - a reason code, not a secret
    BAD_ALGORITHM = "bad-algorithm"
    CREDENTIAL_MALFORMED = "credential-malformed"
    UNTRUSTED_ISSUER = "untrusted-issuer"
    CREDENTIAL_EXPIRED = "credential-expired"
    CREDENTIAL_NOT_YET_VALID = "credential-not-yet-valid"
    BAD_SIGNATURE = "bad-signature"
    ISSUER_MISMATCH = "issuer-mismatch"
    WRONG_AUDIENCE = "wrong-audience"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    LIFETIME_TOO_LONG = "lifetime-too-long"
    REPLAYED = "replayed"
    REVOKED = "revoked"
    REVOCATION_UNKNOWN = "revocation-unknown"


# The caller is known and authentic but its membership does not hold: that is a 403, not a 401.
_FORBIDDEN = frozenset({Reason.REVOKED, Reason.REVOCATION_UNKNOWN})


class TokenRejectedError(AuthenticationError):
    """401: the caller could not be authenticated. `reason` says why."""

    def __init__(self, reason: Reason, detail: str, **extra: Any) -> None:
        super().__init__(detail, reason=reason.value, **extra)
        self.reason = reason


class MembershipDeniedError(ForbiddenError):
    """403: the caller is authentic but its membership is revoked or cannot be confirmed."""

    def __init__(self, reason: Reason, detail: str, **extra: Any) -> None:
        super().__init__(detail, reason=reason.value, **extra)
        self.reason = reason


def reject(reason: Reason, detail: str, **extra: Any) -> TokenRejectedError | MembershipDeniedError:
    """The error for `reason`: 403 for revocation reasons, 401 for everything else."""
    if reason in _FORBIDDEN:
        return MembershipDeniedError(reason, detail, **extra)
    return TokenRejectedError(reason, detail, **extra)
