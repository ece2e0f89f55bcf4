"""Stable integer keys of FHIR resources, shared by the clinical store and the consent registry."""

from __future__ import annotations

import hashlib

__all__ = ["fhir_key", "person_id_for"]


def fhir_key(type_and_id: str) -> int:
    """Natural key of a FHIR resource as a positive 63-bit integer: first 8 bytes of MD5, little-endian, >> 1.

    MD5 here is a stable hash for ids, not a security control; collisions at 10^7 rows are ~10^-5 likely.
    The clinical store computes the same value in SQL (its `hs_key` macro), so both sides must not change.
    """
    digest = hashlib.md5(type_and_id.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def person_id_for(patient_id: str) -> int:
    """The OMOP `person_id` of FHIR `Patient/<patient_id>`: one person id in store and consent registry."""
    return fhir_key(f"Patient/{patient_id}")
