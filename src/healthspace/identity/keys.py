"""Ed25519 signing keys of the authority and the participants, kept encrypted at rest.

Key file format (JSON, mode 0600), `"format": "healthspace-ed25519-key/1"`:

    {"format": ..., "key_id": ..., "public_key": <base64url raw 32 bytes>,
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": <base64url 16 bytes>},
     "cipher": "AES-256-GCM", "nonce": <base64url 12 bytes>, "ciphertext": <base64url 32 + 16 bytes>}

The 32-byte private seed is sealed with AES-256-GCM under a key derived from the KEK by scrypt; the
associated data binds the format, KDF parameters and public key, so altering any of them is detected.
The public key and key id stay readable without the KEK. See docs/adr/0002-identity-and-tokens.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from healthspace.core.errors import ConfigurationError, ConflictError, ValidationError
from healthspace.identity._jws import b64url_decode, b64url_encode

__all__ = [
    "KEY_FILE_FORMAT",
    "SigningKey",
    "key_id_of",
    "public_key_from_b64",
    "verify_signature",
]

KEY_FILE_FORMAT = "healthspace-ed25519-key/1"
MIN_KEK_BYTES = 16
# scrypt cost: 32 MiB and a few tens of milliseconds, paid once when a service starts. It makes a weak,
# password-like KEK expensive to guess from a stolen key file; a random KEK loses nothing by it.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
# Upper bound on parameters read from a file, so a doctored file cannot make `load` eat the machine.
_SCRYPT_MAX_N = 2**20


def key_id_of(public_key_raw: bytes) -> str:
    """Stable key id: the first 16 hex digits of SHA-256 over the raw 32-byte public key."""
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


def public_key_from_b64(public_key_b64: str) -> Ed25519PublicKey:
    """Parse a raw 32-byte Ed25519 public key written as base64url without padding.

    Raises `ValidationError` for anything else (wrong alphabet, padding, length).
    """
    try:
        raw = b64url_decode(public_key_b64)
    except ValueError:
        raise ValidationError("public key is not base64url (unpadded)") from None
    if len(raw) != 32:
        raise ValidationError(f"an Ed25519 public key has 32 bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(public_key_b64: str, data: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `data` by the key; False for any defect."""
    try:
        public_key_from_b64(public_key_b64).verify(signature, data)
    except (ValidationError, InvalidSignature):
        return False
    return True


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _check_kek(kek: bytes) -> None:
    if not isinstance(kek, bytes) or len(kek) < MIN_KEK_BYTES:
        raise ConfigurationError(f"the key-encryption key must be at least {MIN_KEK_BYTES} bytes")


def _wrapping_key(kek: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(kek)


def _associated_data(public_key_b64: str, n: int, r: int, p: int, salt_b64: str) -> bytes:
    return f"{KEY_FILE_FORMAT}|scrypt|{n}|{r}|{p}|{salt_b64}|{public_key_b64}".encode()


class SigningKey:
    """An Ed25519 private key with its public half, its key id and encrypted persistence.

    Satisfies the audit log's `Signer` protocol (`key_id`, `public_key_b64`, `sign`). The private key
    never leaves this object except through `private_key`, which signing libraries (PyJWT) need.
    """

    __slots__ = ("_key_id", "_private", "_public_b64")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        raw = _raw_public(private_key.public_key())
        self._public_b64 = b64url_encode(raw)
        self._key_id = key_id_of(raw)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def public_key_b64(self) -> str:
        """The raw 32-byte public key, base64url without padding."""
        return self._public_b64

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private.public_key()

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """For signing libraries only; never serialise it outside `save`."""
        return self._private

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of `data`."""
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self._key_id!r})"

    # --- at rest ----------------------------------------------------------------------------------
    def save(self, path: Path, kek: bytes, *, overwrite: bool = False) -> None:
        """Write the key to `path`, encrypted under `kek`, readable by the owner only (0600).

        The file appears atomically (written beside it, then renamed). An existing file is an error
        unless `overwrite`: replacing a service's key silently would orphan its credential.
        """
        _check_kek(kek)
        path = Path(path)
        if path.exists() and not overwrite:
            raise ConflictError(f"a key file already exists at {path}")
        seed = self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
        salt_b64 = b64url_encode(salt)
        aad = _associated_data(self._public_b64, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P, salt_b64)
        sealed = AESGCM(_wrapping_key(kek, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)).encrypt(nonce, seed, aad)
        doc = {
            "format": KEY_FILE_FORMAT,
            "key_id": self._key_id,
            "public_key": self._public_b64,
            "kdf": {"name": "scrypt", "n": _SCRYPT_N, "r": _SCRYPT_R, "p": _SCRYPT_P, "salt": salt_b64},
            "cipher": "AES-256-GCM",
            "nonce": b64url_encode(nonce),
            "ciphertext": b64url_encode(sealed),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o600)  # O_CREAT's mode is filtered by the umask; make sure
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, kek: bytes) -> SigningKey:
        """Read and decrypt a key written by `save`.

        Raises `ConfigurationError` with a plain message when the file is missing or unreadable, is not a
        key file or is damaged, or the KEK is wrong (the KEK itself never appears in the message).
        """
        _check_kek(kek)
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigurationError(f"no key file at {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read the key file {path}: {type(exc).__name__}") from None
        try:
            fields = _parse_key_file(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"{path} is not a healthspace key file or is damaged ({exc})") from None
        public_b64, n, r, p, salt_b64, nonce, sealed = fields
        try:
            wrapping = _wrapping_key(kek, b64url_decode(salt_b64), n, r, p)
            seed = AESGCM(wrapping).decrypt(nonce, sealed, _associated_data(public_b64, n, r, p, salt_b64))
        except InvalidTag:
            raise ConfigurationError(
                f"cannot decrypt the key in {path}: wrong key-encryption key (HEALTHSPACE_KEK) "
                "or the file was altered"
            ) from None
        key = cls(Ed25519PrivateKey.from_private_bytes(seed))
        if key.public_key_b64 != public_b64:
            raise ConfigurationError(f"{path} is damaged: its private and public keys do not match")
        return key


def _parse_key_file(text: str) -> tuple[str, int, int, int, str, bytes, bytes]:
    doc: Any = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
        raise ValueError(f"format is not {KEY_FILE_FORMAT}")
    kdf = doc["kdf"]
    if kdf["name"] != "scrypt" or doc["cipher"] != "AES-256-GCM":
        raise ValueError("unsupported kdf or cipher")
    n, r, p = kdf["n"], kdf["r"], kdf["p"]
    if not all(type(v) is int for v in (n, r, p)):
        raise ValueError("kdf parameters are not integers")
    if not (2 <= n <= _SCRYPT_MAX_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError("kdf parameters out of range")
    public_b64 = doc["public_key"]
    if not isinstance(public_b64, str) or len(b64url_decode(public_b64)) != 32:
        raise ValueError("public key is not 32 bytes")
    salt_b64 = kdf["salt"]
    if not isinstance(salt_b64, str) or len(b64url_decode(salt_b64)) < 16:
        raise ValueError("salt is too short")
    nonce = b64url_decode(doc["nonce"])
    sealed = b64url_decode(doc["ciphertext"])
    if len(nonce) != 12 or len(sealed) != 48:
        raise ValueError("nonce or ciphertext has the wrong length")
    return public_b64, n, r, p, salt_b64, nonce, sealed
