"""Peer identity: an Ed25519 key, kept with 0600 permissions, and the peer id derived from it.

The peer id *is* the public key (base32, lowercase, with a `p` in front), so anyone holding a
record can check its signature without asking for a key first, and an id cannot be claimed
without the matching private key.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError

_PREFIX = "p"
PEER_ID_LEN = 1 + 52  # prefix + base32 of 32 bytes without padding


def peer_id_from_public(public_bytes: bytes) -> str:
    return _PREFIX + base64.b32encode(public_bytes).decode().rstrip("=").lower()


def public_from_peer_id(peer_id: str) -> bytes:
    """The raw public key inside a peer id; ValueError if the id is malformed."""
    if not isinstance(peer_id, str) or len(peer_id) != PEER_ID_LEN or not peer_id.startswith(_PREFIX):
        raise ValueError("malformed peer id")
    raw = base64.b32decode(peer_id[1:].upper() + "====")
    if len(raw) != 32:
        raise ValueError("malformed peer id")
    return raw


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    """True when `signature` over `data` was made by the key behind `peer_id`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_from_peer_id(peer_id)).verify(signature, data)
    except (ValueError, InvalidSignature, TypeError):
        return False
    return True


def short(peer_id: str) -> str:
    """A short form for logs and tables."""
    return peer_id[:10]


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey
    public_bytes: bytes
    peer_id: str

    @classmethod
    def from_private(cls, key: Ed25519PrivateKey) -> "Identity":
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(key, pub, peer_id_from_public(pub))

    @classmethod
    def generate(cls) -> "Identity":
        return cls.from_private(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> "Identity":
        """Load the key at `path`, or create it there (0600, parent 0700) on first start."""
        path = Path(path)
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"identity file {path} is not a PEM private key: {e}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"identity file {path} does not hold an Ed25519 key")
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return cls.from_private(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)  # atomic: a crash never leaves half a key
        return cls.from_private(key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @property
    def short_id(self) -> str:
        return short(self.peer_id)


def config_home() -> Path:
    """Where keys live: $SWARM_CONFIG, else $XDG_CONFIG_HOME/swarm, else ~/.config/swarm."""
    if os.environ.get("SWARM_CONFIG"):
        return Path(os.environ["SWARM_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "swarm"


def default_identity_path(port: int) -> Path:
    """One key per port, so several peers on one machine get distinct, stable ids."""
    return config_home() / "keys" / f"peer-{port}.pem"
