"""Tamper-evident audit log: RFC 6962 Merkle tree over canonical entries, signed tree heads, proofs."""

from healthspace.audit.log import (
    AuditIntegrityError,
    AuditLog,
    AuditUnavailableError,
    ConsistencyProof,
    InclusionProof,
    LoggedEntry,
    export_database,
    verify_database,
)
from healthspace.audit.models import AuditEntry, Outcome, Receipt, SignedTreeHead, Signer, VerifyReport
from healthspace.audit.verify import verify_export

__all__ = [
    "AuditEntry",
    "AuditIntegrityError",
    "AuditLog",
    "AuditUnavailableError",
    "ConsistencyProof",
    "InclusionProof",
    "LoggedEntry",
    "Outcome",
    "Receipt",
    "SignedTreeHead",
    "Signer",
    "VerifyReport",
    "export_database",
    "verify_database",
    "verify_export",
]
