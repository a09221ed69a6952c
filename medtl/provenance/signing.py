"""Ed25519 signatures in a DSSE envelope (https://github.com/secure-systems-lab/dsse).

The statement is signed over DSSE's pre-authentication encoding (PAE), so the
payload type is bound into the signature and the payload bytes are signed as
written, with no JSON canonicalisation. Key ids follow securesystemslib, so
its stock DSSE verifier (and in-toto tooling built on it) accepts the envelope.
Private keys are PKCS#8 PEM encrypted with a passphrase.
"""
from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import json
import os
import sys
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medtl.errors import MedtlError
from medtl.io import atomic_path

PAYLOAD_TYPE = "application/vnd.in-toto+json"
PRIVATE_NAME = "medtl-signing.key"
PUBLIC_NAME = "medtl-signing.pub"
PASSPHRASE_ENV = "MEDTL_SIGNING_PASSPHRASE"
KEY_TYPE = SCHEME = "ed25519"  # securesystemslib's names for the key type and signature scheme
MIN_PASSPHRASE = 12
# PKCS#8 PBES2 key derivation: PBKDF2-HMAC-SHA256 at OWASP's current work factor. cryptography's own
# BestAvailableEncryption uses 2,048 iterations; keys written that way (older medtl) still open.
KDF_ITERATIONS = 600_000


def pae(payload_type: str, payload: bytes) -> bytes:
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def keyid(public_key: Ed25519PublicKey) -> str:
    """securesystemslib's default key id: sha256 of the canonical JSON of {keytype, scheme, keyval}."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    # canonical JSON (sorted keys, no whitespace); every value here is ASCII, so json.dumps produces it exactly
    doc = {"keytype": KEY_TYPE, "scheme": SCHEME, "keyval": {"public": raw}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


def legacy_keyid(public_key: Ed25519PublicKey) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: the key id of envelopes signed by earlier medtl versions."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _passphrase_from(file: str | Path | None) -> bytes | None:
    """The passphrase from --passphrase-file (its first line) or MEDTL_SIGNING_PASSPHRASE; None if neither is given."""
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MedtlError(f"--passphrase-file {file} cannot be read: {getattr(e, 'strerror', None) or e}") from e
        value = text.splitlines()[0] if text.splitlines() else ""
        if not value:
            raise MedtlError(f"--passphrase-file {file} is empty; its first line is the passphrase")
        return value.encode("utf-8")
    value = os.environ.get(PASSPHRASE_ENV)
    if value is not None:
        if not value:
            raise MedtlError(f"{PASSPHRASE_ENV} is set but empty")
        return value.encode("utf-8")
    return None


def _interactive() -> bool:
    return sys.stdin.isatty()


def new_passphrase(file: str | Path | None = None) -> bytes:
    """The passphrase for a new key: file, environment, or typed twice at a terminal."""
    given = _passphrase_from(file)
    if given is not None:
        return _long_enough(given, f"the passphrase in {file}" if file is not None else f"{PASSPHRASE_ENV}")
    if not _interactive():
        raise MedtlError(f"a passphrase is needed to protect the private key: set {PASSPHRASE_ENV}, pass --passphrase-file FILE, "
                         "run in a terminal to type it, or pass --no-passphrase to write the key unencrypted")
    first = getpass.getpass("passphrase for the new signing key: ")
    if not first:
        raise MedtlError("an empty passphrase does not protect the key; pass --no-passphrase to write it unencrypted")
    _long_enough(first.encode("utf-8"), "the passphrase")
    if getpass.getpass("the same passphrase again: ") != first:
        raise MedtlError("the two passphrases differ; nothing was written")
    return first.encode("utf-8")


def _long_enough(passphrase: bytes, what: str) -> bytes:
    n = len(passphrase.decode("utf-8", errors="replace"))
    if n < MIN_PASSPHRASE:
        raise MedtlError(f"{what} has {n} characters; a signing key's passphrase needs at least {MIN_PASSPHRASE} "
                         "(e.g. four random words); nothing was written")
    return passphrase


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    size = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + size + content


def _oid(dotted: str) -> bytes:
    parts = [int(x) for x in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for v in parts[2:]:
        chunk = [v & 0x7F]
        while v > 0x7F:
            v >>= 7
            chunk.insert(0, 0x80 | (v & 0x7F))
        body += bytes(chunk)
    return _der(0x06, body)


def _int(v: int) -> bytes:
    return _der(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big"))


def encrypt_pkcs8(key: Ed25519PrivateKey, passphrase: bytes, iterations: int = KDF_ITERATIONS) -> bytes:
    """PEM `ENCRYPTED PRIVATE KEY` (RFC 5958 / RFC 8018 PBES2): PBKDF2-HMAC-SHA256 at `iterations`, AES-256-CBC.

    Written here because cryptography fixes the iteration count of its PKCS#8 encryption; OpenSSL
    (`openssl pkey`) and cryptography read the result like any encrypted PKCS#8 key.
    """
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    plain = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    salt, iv = os.urandom(16), os.urandom(16)
    derived = hashlib.pbkdf2_hmac("sha256", passphrase, salt, iterations, dklen=32)
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(derived), modes.CBC(iv)).encryptor()
    data = enc.update(padder.update(plain) + padder.finalize()) + enc.finalize()
    seq = lambda *items: _der(0x30, b"".join(items))  # noqa: E731
    kdf = seq(_oid("1.2.840.113549.1.5.12"),  # PBKDF2
              seq(_der(0x04, salt), _int(iterations), seq(_oid("1.2.840.113549.2.9"), b"\x05\x00")))  # hmacWithSHA256
    scheme = seq(_oid("2.16.840.1.101.3.4.1.42"), _der(0x04, iv))  # aes256-CBC
    der = seq(seq(_oid("1.2.840.113549.1.5.13"), seq(kdf, scheme)), _der(0x04, data))  # PBES2
    b64 = base64.encodebytes(der).decode("ascii").replace("\n", "")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END ENCRYPTED PRIVATE KEY-----\n").encode("ascii")


def keygen(out_dir: str | Path, force: bool = False, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Write an Ed25519 key pair; the private key is encrypted with `passphrase` (None: unencrypted)."""
    out = Path(out_dir)
    private, public = out / PRIVATE_NAME, out / PUBLIC_NAME
    if not force and (private.exists() or public.exists()):
        raise MedtlError(f"{private} or {public} already exists; choose another --out or pass --force to replace them")
    key = Ed25519PrivateKey.generate()
    if passphrase:
        pem = encrypt_pkcs8(key, _long_enough(passphrase, "the passphrase"))
    else:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with atomic_path(private, mode=0o600) as tmp:  # the private key is never readable by others, even briefly
        tmp.write_bytes(pem)
    with atomic_path(public) as tmp:
        tmp.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: str | Path, passphrase_file: str | Path | None = None) -> Ed25519PrivateKey:
    """The signing key; an encrypted one is opened with the passphrase from the file, the environment or the terminal."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise MedtlError(f"signing key {path} cannot be read: {e.strerror or e}") from e
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    password = None
    if encrypted:
        password = _passphrase_from(passphrase_file)
        if password is None:
            if not _interactive():
                raise MedtlError(f"signing key {path} is protected by a passphrase: set {PASSPHRASE_ENV} or pass --passphrase-file FILE")
            password = getpass.getpass(f"passphrase for {path}: ").encode("utf-8")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as e:
        if encrypted:
            raise MedtlError(f"signing key {path} cannot be opened: wrong passphrase (or a damaged key file)") from e
        raise MedtlError(f"signing key {path} is not a PEM private key: {e}") from e
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
        try:  # an unencrypted private key file also holds the public key
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as e:
            if b"ENCRYPTED" in data:
                raise MedtlError(f"{path} is an encrypted private key; pass the .pub file `medtl keygen` wrote beside it") from None
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
    kids = {kid, legacy_keyid(public_key)}
    message = pae(env["payloadType"], payload)
    tried = 0
    for s in env["signatures"]:
        if not isinstance(s, dict) or (s.get("keyid") and s["keyid"] not in kids):
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
