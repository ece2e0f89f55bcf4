"""Dataspace Protocol 2025-1: schemas, wire models and process state machines (transport-independent)."""
