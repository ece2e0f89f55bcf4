"""Typed errors of the clinical data store: missing or wrong keys, broken or busy stores."""

from __future__ import annotations

from healthspace.core.errors import ConflictError, HealthspaceError, NotFoundError

__all__ = [
    "DatasetDestroyedError",
    "DatasetUnavailableError",
    "KeyUnavailableError",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreNotFoundError",
    "WrongKeyError",
]


class KeyUnavailableError(HealthspaceError):
    """The key-encryption key is not in the key store (never created, or destroyed: crypto-shredded)."""

    status = 403
    code = "key-unavailable"
    title = "Encryption key unavailable"


class WrongKeyError(HealthspaceError):
    """The key store answered, but its key does not open this dataset."""

    status = 403
    code = "wrong-key"
    title = "Encryption key does not match"


class StoreNotFoundError(NotFoundError):
    code = "store-not-found"
    title = "Clinical store not found"


class StoreCorruptError(HealthspaceError):
    status = 500
    code = "store-corrupt"
    title = "Clinical store is damaged"


class StoreBusyError(ConflictError):
    """Another process is writing to the store; one writer at a time."""

    code = "store-busy"
    title = "Clinical store is busy"


class DatasetUnavailableError(ConflictError):
    """The dataset's state does not allow this (reading an archived one, ingesting a published one)."""

    code = "dataset-unavailable"
    title = "Dataset not available in its current state"


class DatasetDestroyedError(HealthspaceError):
    """The dataset was destroyed (crypto-shredded); nothing of it can be read again."""

    status = 410
    code = "dataset-destroyed"
    title = "Dataset destroyed"
