"""Consent registry of a hospital connector: patients' per-scenario decisions, FHIR Consent, receipts."""
