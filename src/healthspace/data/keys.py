"""Key-encryption keys: the `KeyStore` protocol and a local file implementation.

Envelope encryption: each dataset has its own random data key; only its wrapped form (encrypted under a
key-encryption key, KEK) is written beside the data. Destroying the KEK makes the dataset unreadable
(crypto-shredding). A KMS or Vault transit engine fits the same three calls.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from healthspace.core.errors import ValidationError
from healthspace.data.errors import KeyUnavailableError, WrongKeyError

__all__ = ["KeyStore", "LocalKeyStore", "new_data_key"]

_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NONCE = 12
_VERSION = b"\x01"


def new_data_key() -> bytes:
    """A fresh 256-bit data key."""
    return secrets.token_bytes(32)


@runtime_checkable
class KeyStore(Protocol):
    """Holds key-encryption keys by id and never lets them out.

    Contract: `wrap` creates the KEK on first use of an id; `unwrap` MUST raise `KeyUnavailableError` when the
    id is unknown or destroyed and `WrongKeyError` when the wrapped bytes were not made by that KEK;
    `destroy` is idempotent.
    """

    def wrap(self, key_id: str, plaintext: bytes) -> bytes: ...

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes: ...

    def destroy(self, key_id: str) -> None: ...


class LocalKeyStore:
    """KEKs as 32-byte files (mode 0600) in one directory; AES-256-GCM wrapping with the key id as AAD.

    Meant for development and single-host deployments; keep the directory off the volume that holds the
    data, so that a copied data volume alone does not open.
    """

    def __init__(self, directory: Path) -> None:
        self._dir = Path(directory)

    def _path(self, key_id: str) -> Path:
        if not _KEY_ID.match(key_id):
            raise ValidationError(f"invalid key id {key_id!r}")
        return self._dir / f"{key_id}.kek"

    def _load(self, key_id: str, *, create: bool) -> bytes:
        path = self._path(key_id)
        if path.exists():
            kek = path.read_bytes()
            if len(kek) != 32:
                raise KeyUnavailableError(f"key {key_id!r} is damaged")
            return kek
        if not create:
            raise KeyUnavailableError(f"key {key_id!r} is not in the key store")
        self._dir.mkdir(parents=True, exist_ok=True)
        kek = secrets.token_bytes(32)
        # O_EXCL so that two processes creating the same id cannot overwrite each other's key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(kek)
        return kek

    def wrap(self, key_id: str, plaintext: bytes) -> bytes:
        kek = self._load(key_id, create=True)
        nonce = secrets.token_bytes(_NONCE)
        return _VERSION + nonce + AESGCM(kek).encrypt(nonce, plaintext, key_id.encode())

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        kek = self._load(key_id, create=False)
        if len(wrapped) < 1 + _NONCE + 16 or wrapped[:1] != _VERSION:
            raise WrongKeyError(f"wrapped key for {key_id!r} is malformed")
        nonce, body = wrapped[1 : 1 + _NONCE], wrapped[1 + _NONCE :]
        try:
            return AESGCM(kek).decrypt(nonce, body, key_id.encode())
        except InvalidTag:
            raise WrongKeyError(f"key {key_id!r} does not unwrap this data key") from None

    def destroy(self, key_id: str) -> None:
        path = self._path(key_id)
        if path.exists():
            # Overwrite before unlinking; on copy-on-write or journalled file systems this is best effort.
            size = path.stat().st_size
            with path.open("r+b") as f:
                f.write(secrets.token_bytes(size))
                f.flush()
                os.fsync(f.fileno())
            path.unlink()
