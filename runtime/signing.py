"""Ed25519 signatures over a bundle's SHA256SUMS, with `cryptography` (the runtime's `signing` extra).

The signature file holds the raw 64 signature bytes, so a device without Python checks it with
OpenSSL alone: `openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin -in SHA256SUMS -sigfile
SHA256SUMS.sig`. Keys are PEM files as `openssl genpkey -algorithm ed25519` writes them (private:
PKCS#8, public: SubjectPublicKeyInfo).
"""

from __future__ import annotations

from pathlib import Path

from .errors import RunError

MAX_KEY_BYTES = 64 * 1024
INSTALL_HINT = "pip install 'gfcompile-runtime[signing]' (or: pip install cryptography)"


def sign(message: bytes, private_key: Path) -> bytes:
    """The raw Ed25519 signature of `message` with the PEM private key at `private_key`."""
    serialization, ed25519 = _cryptography("--sign-key")
    try:
        key = serialization.load_pem_private_key(_read_key(private_key), password=None)
    except TypeError:
        raise RunError(f"{private_key}: the key is encrypted; give an unencrypted PEM key") from None
    except ValueError:
        raise RunError(
            f"{private_key}: not a PEM private key (make one with `openssl genpkey -algorithm ed25519 -out KEY`)"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise RunError(f"{private_key}: not an Ed25519 key; bundles are signed with Ed25519")
    return key.sign(message)


def verify(message: bytes, signature: bytes, public_key: Path, what: str) -> None:
    """Raise RunError unless `signature` is `public_key`'s Ed25519 signature of `message`."""
    serialization, ed25519 = _cryptography("--trusted-key")
    from cryptography.exceptions import InvalidSignature

    try:
        key = serialization.load_pem_public_key(_read_key(public_key))
    except ValueError:
        raise RunError(f"{public_key}: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise RunError(f"{public_key}: not an Ed25519 public key; bundles are signed with Ed25519")
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise RunError(
            f"{what}: the signature does not match the trusted key {public_key}: changed after signing, "
            "or signed by someone else; refused before loading anything"
        ) from None


def _read_key(path: Path) -> bytes:
    return read_capped(path, MAX_KEY_BYTES, "cannot read the key", "too large for a PEM key")


def read_capped(path: Path, limit: int, cannot_read: str, too_large: str) -> bytes:
    """At most `limit` bytes of `path` (reading one more to tell), or RunError "<path>: <message>"."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise RunError(f"{path}: {cannot_read} ({(exc.strerror or type(exc).__name__).lower()})") from None
    if len(data) > limit:
        raise RunError(f"{path}: {too_large}")
    return data


def _cryptography(purpose: str):
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise RunError(f"{purpose} needs the cryptography package: {INSTALL_HINT}") from None
    return serialization, ed25519
