"""Ed25519 signatures in a DSSE envelope (https://github.com/secure-systems-lab/dsse).

The statement is signed over DSSE's pre-authentication encoding (PAE), so the
payload type is bound into the signature and the payload bytes are signed as
written, with no JSON canonicalisation.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medtl.errors import MedtlError
from medtl.io import atomic_path

PAYLOAD_TYPE = "application/vnd.in-toto+json"
PRIVATE_NAME = "medtl-signing.key"
PUBLIC_NAME = "medtl-signing.pub"


def pae(payload_type: str, payload: bytes) -> bytes:
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def keyid(public_key: Ed25519PublicKey) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: a stable name for the key."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def keygen(out_dir: str | Path, force: bool = False) -> tuple[Path, Path]:
    out = Path(out_dir)
    private, public = out / PRIVATE_NAME, out / PUBLIC_NAME
    if not force and (private.exists() or public.exists()):
        raise MedtlError(f"{private} or {public} already exists; choose another --out or pass --force to replace them")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with atomic_path(private) as tmp:
        os.chmod(tmp, 0o600)  # the private key must not be world-readable, even briefly
        tmp.write_bytes(pem)
    with atomic_path(public) as tmp:
        tmp.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise MedtlError(f"signing key {path} cannot be read: {e.strerror or e}") from e
    except (ValueError, TypeError) as e:
        raise MedtlError(f"signing key {path} is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise MedtlError(f"signing key {path} is a {type(key).__name__}; medtl signs with Ed25519 (make one with `medtl keygen`)")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise MedtlError(f"public key {path} cannot be read: {e.strerror or e}") from e
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:  # a private key file also holds the public key
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as e:
            raise MedtlError(f"public key {path} is not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise MedtlError(f"public key {path} is a {type(key).__name__}; expected Ed25519")
    return key


def sign(payload: bytes, key: Ed25519PrivateKey, payload_type: str = PAYLOAD_TYPE) -> dict:
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": keyid(key.public_key()), "sig": base64.b64encode(key.sign(pae(payload_type, payload))).decode("ascii")}],
    }


def read_envelope(path: str | Path) -> tuple[dict, bytes]:
    """The envelope and its decoded payload; a malformed envelope is a MedtlError naming the file."""
    try:
        env = json.loads(Path(path).read_text(encoding="utf-8"))
        payload = base64.b64decode(env["payload"], validate=True)
        if not isinstance(env["payloadType"], str) or not isinstance(env["signatures"], list):
            raise TypeError("payloadType must be a string and signatures a list")
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as e:
        raise MedtlError(f"{path} is not a DSSE envelope: {e}") from e
    return env, payload


def check_envelope(env: dict, payload: bytes, public_key: Ed25519PublicKey) -> str | None:
    """None when a signature by `public_key` is valid, else why not."""
    if env.get("payloadType") != PAYLOAD_TYPE:
        return f"payloadType is {env.get('payloadType')!r}, expected {PAYLOAD_TYPE!r}"
    kid = keyid(public_key)
    message = pae(env["payloadType"], payload)
    tried = 0
    for s in env["signatures"]:
        if not isinstance(s, dict) or (s.get("keyid") and s["keyid"] != kid):
            continue
        tried += 1
        try:
            public_key.verify(base64.b64decode(s.get("sig", ""), validate=True), message)
            return None
        except (InvalidSignature, ValueError, binascii.Error):
            continue
    if not tried:
        return f"no signature by key {kid[:16]}… (signed by {', '.join(str(s.get('keyid', '?'))[:16] for s in env['signatures'] if isinstance(s, dict)) or 'nobody'})"
    return f"signature by key {kid[:16]}… does not match the payload"
