"""Signing keys: identity of a key, signatures, and the encrypted key file."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from healthspace.core.errors import ConfigurationError, ConflictError, ValidationError
from healthspace.identity.keys import SigningKey, public_key_from_b64, verify_signature

from .kit import b64, unb64

KEK = b"correct horse battery staple 42"
OTHER_KEK = b"another key-encryption key, wrong"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, Path]:
    """One key saved once: scrypt costs ~0.1 s per save or load, so the file is shared by the tests."""
    key = SigningKey.generate()
    path = tmp_path_factory.mktemp("keys") / "participant.key"
    key.save(path, KEK)
    return key, path


def test_public_key_is_raw_32_bytes_in_unpadded_base64url() -> None:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key = SigningKey(private)
    assert key.public_key_b64 == b64(raw)
    assert "=" not in key.public_key_b64


def test_key_id_is_first_16_hex_of_sha256_of_raw_public_key() -> None:
    key = SigningKey.generate()
    assert key.key_id == hashlib.sha256(unb64(key.public_key_b64)).hexdigest()[:16]


def test_signature_verifies_with_cryptography_directly() -> None:
    key = SigningKey.generate()
    signature = key.sign(b"tree head")
    key.public_key.verify(signature, b"tree head")  # raises if invalid
    assert len(signature) == 64


def test_verify_signature_accepts_a_good_signature_and_refuses_other_data() -> None:
    key = SigningKey.generate()
    signature = key.sign(b"a")
    assert verify_signature(key.public_key_b64, b"a", signature)
    assert not verify_signature(key.public_key_b64, b"b", signature)


def test_verify_signature_is_false_for_a_malformed_key() -> None:
    assert not verify_signature("not a key!", b"a", bytes(64))


def test_signing_key_satisfies_the_audit_signer_protocol() -> None:
    audit_models = pytest.importorskip("healthspace.audit.models")
    assert isinstance(SigningKey.generate(), audit_models.Signer)


def test_repr_shows_the_key_id_only() -> None:
    key = SigningKey.generate()
    seed = key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert repr(key) == f"SigningKey(key_id='{key.key_id}')"
    assert b64(seed) not in repr(key)


@pytest.mark.parametrize(
    "text",
    ["", "AAAA", "A" * 43 + "=", "+" * 43, b64(bytes(31)), b64(bytes(33))],
    ids=["empty", "short", "padded", "std-alphabet", "31-bytes", "33-bytes"],
)
def test_public_key_from_b64_refuses_anything_but_32_unpadded_bytes(text: str) -> None:
    with pytest.raises(ValidationError):
        public_key_from_b64(text)


def test_key_round_trips_through_an_encrypted_file(saved: tuple[SigningKey, Path]) -> None:
    key, path = saved
    loaded = SigningKey.load(path, KEK)
    assert loaded.public_key_b64 == key.public_key_b64
    assert verify_signature(key.public_key_b64, b"x", loaded.sign(b"x"))


def test_key_file_does_not_contain_the_private_key(saved: tuple[SigningKey, Path]) -> None:
    key, path = saved
    seed = key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    pkcs8 = key.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    content = path.read_bytes()
    assert seed not in content
    assert b64(seed).encode() not in content
    assert pkcs8 not in content
    assert b"PRIVATE KEY" not in content


def test_key_file_is_readable_by_its_owner_only(saved: tuple[SigningKey, Path]) -> None:
    _, path = saved
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_key_file_names_its_public_key_without_needing_the_kek(saved: tuple[SigningKey, Path]) -> None:
    key, path = saved
    doc = json.loads(path.read_text())
    assert doc["public_key"] == key.public_key_b64
    assert doc["key_id"] == key.key_id


def test_wrong_kek_is_a_configuration_error_that_does_not_echo_it(saved: tuple[SigningKey, Path]) -> None:
    _, path = saved
    with pytest.raises(ConfigurationError, match="wrong key-encryption key") as info:
        SigningKey.load(path, OTHER_KEK)
    assert OTHER_KEK.decode() not in str(info.value)
    assert KEK.decode() not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_missing_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no key file"):
        SigningKey.load(tmp_path / "absent.key", KEK)


@pytest.mark.parametrize(
    "content",
    ["", "not json", "[]", '{"format": "something-else"}', '{"format": "healthspace-ed25519-key/1"}'],
    ids=["empty", "not-json", "json-array", "other-format", "fields-missing"],
)
def test_corrupt_key_file_is_a_configuration_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match="not a healthspace key file or is damaged"):
        SigningKey.load(path, KEK)


def test_altered_ciphertext_is_detected(saved: tuple[SigningKey, Path], tmp_path: Path) -> None:
    _, path = saved
    doc = json.loads(path.read_text())
    sealed = bytearray(unb64(doc["ciphertext"]))
    sealed[0] ^= 1
    doc["ciphertext"] = b64(bytes(sealed))
    altered = tmp_path / "altered.key"
    altered.write_text(json.dumps(doc))
    with pytest.raises(ConfigurationError, match="or the file was altered"):
        SigningKey.load(altered, KEK)


def test_swapped_public_key_is_detected(saved: tuple[SigningKey, Path], tmp_path: Path) -> None:
    _, path = saved
    doc = json.loads(path.read_text())
    doc["public_key"] = SigningKey.generate().public_key_b64  # e.g. to make a tool trust another key
    altered = tmp_path / "swapped.key"
    altered.write_text(json.dumps(doc))
    with pytest.raises(ConfigurationError):
        SigningKey.load(altered, KEK)


def test_absurd_kdf_cost_in_a_file_is_refused_before_any_work(
    saved: tuple[SigningKey, Path], tmp_path: Path
) -> None:
    _, path = saved
    doc = json.loads(path.read_text())
    doc["kdf"]["n"] = 2**30
    altered = tmp_path / "costly.key"
    altered.write_text(json.dumps(doc))
    with pytest.raises(ConfigurationError, match="out of range"):
        SigningKey.load(altered, KEK)


def test_save_refuses_to_overwrite_an_existing_key(saved: tuple[SigningKey, Path]) -> None:
    _, path = saved
    with pytest.raises(ConflictError):
        SigningKey.generate().save(path, KEK)


def test_short_kek_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        SigningKey.generate().save(tmp_path / "k.key", b"short")
