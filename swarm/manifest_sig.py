"""The preparer's signature over a manifest: `manifest.sig` beside `manifest.json`.

The swarm names a model by `Manifest.model_hash` (sha256 of the canonical manifest JSON), so a
peer that fetches a manifest checks first that its hash is the one the swarm announces. The
signature adds accountability: it says which key prepared these exact bytes (the peer id of a
"preparer" key kept in the config folder, 0600, like peer keys), so a bad model can be traced to
its preparer and refused by id. It signs a context string plus the canonical JSON, so it is never
valid as any other kind of signature (a gossip record, a TLS binding).

`manifest.sig` is JSON: {"signer": <peer id>, "signature": <hex of 64 bytes>}.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .identity import Identity, config_home, verify
from .manifest import Manifest, canonical_json

SIG_FILE = "manifest.sig"
_CONTEXT = b"swarm/manifest/1\x00"


@dataclass(frozen=True)
class ManifestSignature:
    signer: str  # peer id of the preparer's key
    signature: bytes  # Ed25519 over _CONTEXT + canonical manifest JSON

    def to_json(self) -> dict[str, str]:
        return {"signer": self.signer, "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, obj: object) -> "ManifestSignature":
        try:
            m = obj if isinstance(obj, dict) else {}
            return cls(signer=str(m["signer"]), signature=bytes.fromhex(str(m["signature"])))
        except (KeyError, ValueError) as e:
            raise ModelError(f"{SIG_FILE} is malformed ({e})") from None


def manifest_bytes(manifest: Manifest) -> bytes:
    """The exact bytes the model hash and the signature cover."""
    return canonical_json(manifest.to_json())


def sign_bytes(data: bytes, identity: Identity) -> ManifestSignature:
    return ManifestSignature(identity.peer_id, identity.sign(_CONTEXT + data))


def verify_bytes(data: bytes, sig: ManifestSignature) -> bool:
    return verify(sig.signer, _CONTEXT + data, sig.signature)


def preparer_identity() -> Identity:
    """The key that signs what `swarm prepare` writes on this machine."""
    return Identity.load_or_create(config_home() / "keys" / "preparer.pem")


def read_signature(root: Path) -> ManifestSignature | None:
    path = Path(root) / SIG_FILE
    if not path.exists():
        return None
    try:
        return ManifestSignature.from_json(json.loads(path.read_text()))
    except ValueError as e:
        raise ModelError(f"{path} is malformed ({e})") from None


def write_signature(root: Path, sig: ManifestSignature) -> None:
    tmp = Path(root) / (SIG_FILE + ".tmp")
    tmp.write_text(json.dumps(sig.to_json()))
    os.replace(tmp, Path(root) / SIG_FILE)


def ensure_signed(manifest: Manifest, identity: Identity | None = None) -> ManifestSignature:
    """The manifest's valid signature, made now with the preparer key if it has none (a model
    prepared before signatures existed, or just now). A signature that does not verify is replaced."""
    data = manifest_bytes(manifest)
    try:
        sig = read_signature(manifest.root)
    except ModelError:
        sig = None
    if sig is not None and verify_bytes(data, sig):
        return sig
    sig = sign_bytes(data, identity or preparer_identity())
    write_signature(manifest.root, sig)
    return sig


def check_manifest(data: bytes, sig: ManifestSignature, model_hash: str) -> None:
    """Raise ModelError unless `data` hashes to the swarm's `model_hash` and `sig` verifies."""
    got = hashlib.sha256(data).hexdigest()
    if got != model_hash:
        raise ModelError(f"manifest hash {got[:12]} is not the swarm's {model_hash[:12]}: refused")
    if not verify_bytes(data, sig):
        raise ModelError(f"manifest signature by {sig.signer[:10]} does not verify: refused")
