"""RSA key pairs: one key is both a peer's libp2p identity and its DHT record-signing key.

hivemind's p2p daemon reads its identity (``identity_path``) as a libp2p ``PrivateKey`` protobuf
(type RSA, data = the key in DER/PKCS#1), and its :class:`~hivemind.dht.crypto.RSASignatureValidator`
signs records with a :class:`~hivemind.utils.crypto.RSAPrivateKey` (same DER encoding). We store
a key in the identity format, so the same file gives the peer id (``DHT(identity_path=...)``) and
the signing key (:func:`load_key`): a peer's records and its peer id come from one secret.

Public keys are exchanged as OpenSSH text (``ssh-rsa AAAA...``), the form hivemind embeds in
protected DHT keys (``[owner:ssh-rsa AAAA...]``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from umm.atomic import write_bytes_atomic
from umm.net.errors import KeyFileError

logger = logging.getLogger(__name__)


def generate_key():  # -> hivemind.utils.crypto.RSAPrivateKey
    """A fresh 2048-bit RSA private key."""
    from hivemind.utils.crypto import RSAPrivateKey

    return RSAPrivateKey()


def _from_der(der: bytes):
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey.__new__(RSAPrivateKey)
    # RSAPrivateKey has no public constructor from bytes; its unpickling path loads DER.
    key.__setstate__({"_private_key": der})
    return key


def save_key(key, path: str | os.PathLike[str]) -> Path:
    """Write ``key`` to ``path`` as a libp2p identity file (mode 0400), atomically. Returns the path."""
    from hivemind.proto import crypto_pb2

    blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString()
    return write_bytes_atomic(path, blob, mode=0o400)


def load_key(path: str | os.PathLike[str]):  # -> RSAPrivateKey
    """Read a key written by :func:`save_key` (or by hivemind's ``generate_identity``)."""
    from hivemind.proto import crypto_pb2

    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror or e}") from e
    try:
        msg = crypto_pb2.PrivateKey.FromString(blob)
        if msg.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError(f"key type {msg.key_type} is not RSA")
        return _from_der(msg.data)
    except Exception as e:
        raise KeyFileError(
            f"{path} is not an RSA identity key file ({e}); delete it to generate a new identity"
        ) from e


def load_or_create_key(path: str | os.PathLike[str]):  # -> RSAPrivateKey
    """Load the key at ``path``, generating and saving a new one when the file does not exist."""
    path = Path(path)
    if path.exists():
        return load_key(path)
    key = generate_key()
    save_key(key, path)
    logger.info("generated a new identity key in %s", path)
    return key


def public_key_bytes(key) -> bytes:
    """The OpenSSH encoding (``b"ssh-rsa AAAA..."``) of a private or public key's public half."""
    pub = key.get_public_key() if hasattr(key, "get_public_key") else key
    return pub.to_bytes()


def public_key_text(key) -> str:
    """The public key as one line of text (OpenSSH, base64 inside): safe to print and paste."""
    return public_key_bytes(key).decode("ascii")


def parse_public_key(text: str | bytes) -> bytes:
    """Validate an OpenSSH RSA public key (text or bytes); returns its canonical bytes."""
    from hivemind.utils.crypto import RSAPublicKey

    raw = text.encode("ascii", "strict") if isinstance(text, str) else bytes(text)
    try:
        return RSAPublicKey.from_bytes(raw.strip()).to_bytes()
    except Exception as e:
        shown = raw[:40].decode("ascii", "replace")
        raise KeyFileError(f"not an RSA public key in OpenSSH format ('ssh-rsa AAAA...'): {shown!r}...") from e


def peer_id_of(path: str | os.PathLike[str]) -> str:
    """The libp2p peer id (base58) that the DHT derives from the identity file at ``path``."""
    from hivemind.p2p import PeerID

    return PeerID.from_identity(Path(path).read_bytes()).to_base58()
