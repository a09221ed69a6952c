"""Signing keys: passphrases long enough, a current key-derivation work factor, and keys of earlier versions still open."""
from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medtl.cli import main
from medtl.errors import MedtlError
from medtl.provenance import signing


def _der(pem: bytes) -> bytes:
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    return base64.b64decode(body)


@pytest.mark.parametrize("source", ["env", "file"])
def test_a_passphrase_under_12_characters_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys, source):
    monkeypatch.delenv(signing.PASSPHRASE_ENV, raising=False)
    args = ["keygen", "--out", str(tmp_path / "k")]
    if source == "env":
        monkeypatch.setenv(signing.PASSPHRASE_ENV, "x" * 11)
    else:
        (tmp_path / "pass.txt").write_text("short pass\n")
        args += ["--passphrase-file", str(tmp_path / "pass.txt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "at least 12" in err and "characters" in err
    assert not (tmp_path / "k" / signing.PRIVATE_NAME).exists()


def test_new_keys_use_pbkdf2_sha256_at_600000_iterations_and_open_again(tmp_path, monkeypatch):
    monkeypatch.setenv(signing.PASSPHRASE_ENV, "twelve chars")
    assert main(["keygen", "--out", str(tmp_path)]) == 0
    pem = (tmp_path / signing.PRIVATE_NAME).read_bytes()
    der = _der(pem)
    assert signing.KDF_ITERATIONS >= 600_000
    assert signing._oid("1.2.840.113549.1.5.12") in der  # PBKDF2
    assert signing._oid("1.2.840.113549.2.9") in der  # HMAC-SHA256
    assert signing._int(signing.KDF_ITERATIONS) in der
    key = signing.load_private_key(tmp_path / signing.PRIVATE_NAME)
    public = signing.load_public_key(tmp_path / signing.PUBLIC_NAME)
    assert key.public_key().public_bytes_raw() == public.public_bytes_raw()
    # the file is standard encrypted PKCS#8: cryptography opens it with the passphrase, and refuses a wrong one
    serialization.load_pem_private_key(pem, password=b"twelve chars")
    monkeypatch.setenv(signing.PASSPHRASE_ENV, "twelve charz")
    with pytest.raises(MedtlError, match="wrong passphrase"):
        signing.load_private_key(tmp_path / signing.PRIVATE_NAME)


def test_a_key_written_by_an_earlier_version_still_opens(tmp_path, monkeypatch):
    """Earlier medtl wrote keys with cryptography's BestAvailableEncryption (2,048 PBKDF2 iterations)."""
    old = Ed25519PrivateKey.generate()
    pem = old.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(b"short"))  # earlier versions allowed short ones
    (tmp_path / "old.key").write_bytes(pem)
    monkeypatch.setenv(signing.PASSPHRASE_ENV, "short")
    key = signing.load_private_key(tmp_path / "old.key")
    assert key.public_key().public_bytes_raw() == old.public_key().public_bytes_raw()
    envelope = signing.sign(b"{}", key)
    assert signing.check_envelope(envelope, b"{}", old.public_key()) is None
