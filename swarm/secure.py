"""Authenticated, encrypted connections bound to peer identities, for asyncio streams.

Rules of the transport:

* Every connection is TLS 1.3 and nothing older. Each peer's certificate is a self-signed X.509
  certificate whose key *is* the peer's Ed25519 identity key, so the certificate's public key names
  the peer (`peer_id_of_certificate`). TLS 1.3's CertificateVerify proves the server holds that
  key; OpenSSL checks it whatever the verify mode.
* Python's `ssl` cannot run a verify callback, and rejects self-signed certificates under
  CERT_REQUIRED and CERT_OPTIONAL alike (tried: a server with CERT_OPTIONAL drops a client that
  presents one). So both contexts use CERT_NONE for the transport, and identity is checked by us:
  - the client compares the server certificate's key with the peer id it expected, right after
    the TLS handshake and before it sends a single byte of its own;
  - the client proves its identity inside the TLS channel with an Ed25519 signature over a
    transcript that holds both nonces, the hash of the server's certificate, the client's key and
    the TLS channel binding (`tls-unique`, the client Finished message, the same on both ends).
    A relay that shows the client another certificate gets a proof bound to that certificate
    and to its own TLS session, which no other server accepts.
* A private swarm shares a secret (`SwarmKey`). Both sides prove they know it with an HMAC over
  the same transcript under different labels, the server first: the key never travels, and a
  recorded proof is worthless on another connection (fresh nonces, another TLS session).
* Every wait is bounded: the TLS handshake by `ssl_handshake_timeout`, the frames after it by one
  deadline for the whole exchange, so a half-open or trickling caller cannot hold a server.

The exchange after the TLS handshake, in wire frames (`swarm.wire`):

    client -> server   Hello(version, nonce_c, client_public_key)
    server -> client   Challenge(version, nonce_s, server_key_proof)      # b"" without a key
    client -> server   Proof(signature, client_key_proof)                  # b"" without a key
    server -> client   Welcome()                 or  Error(code="auth", message=why), then close

`ClientHandshake` and `ServerHandshake` are the sans-IO cores (messages in, messages out); the
async functions below are the thin layer that feeds them frames from a stream.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from .errors import ConfigError, PeerUnavailable, ProtocolError, RemoteError
from .identity import Identity, peer_id_from_public, short
from .wire import HEADER, Error, Message, decode_body, encode, message

log = logging.getLogger(__name__)

SECURE_VERSION = 1
DEFAULT_TIMEOUT = 5.0
NONCE_LEN = 32
MIN_KEY_BYTES = 16
MAX_KEY_FILE = 64 * 1024
#: handshake frames are a few hundred bytes; anything bigger is garbage, refused unbuffered
MAX_HANDSHAKE_FRAME = 4096

_CONTEXT = b"swarm-secure/1"
_CLIENT_SIGNATURE = b"swarm-secure/1 client signature\x00"
_SERVER_KEY_PROOF = b"swarm-secure/1 server key proof\x00"
_CLIENT_KEY_PROOF = b"swarm-secure/1 client key proof\x00"
_FINGERPRINT = b"swarm-secure/1 key fingerprint"


class AuthError(RemoteError):
    """The remote end is not who we expected, failed to prove its identity or the swarm key, or
    refused ours. Do not retry the same peer with the same settings."""

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(message, code="auth", peer=peer)


# --- the swarm key -------------------------------------------------------------------------------


class SwarmKey:
    """The shared secret of a private swarm. Its repr shows a one-way fingerprint, never the key,
    so it can sit in configs that get logged; compare fingerprints to check two machines agree."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError("a swarm key is bytes")
        if len(secret) < MIN_KEY_BYTES:
            raise ConfigError(
                f"the swarm key is too short ({len(secret)} bytes, need at least {MIN_KEY_BYTES}); "
                "make one with `head -c 32 /dev/urandom | base64 > swarm.key`"
            )
        self._secret = bytes(secret)

    def prove(self, label: bytes, transcript: bytes) -> bytes:
        """HMAC-SHA256 of the labelled transcript: shows we hold the key without sending it."""
        return hmac.new(self._secret, label + transcript, hashlib.sha256).digest()

    def check(self, label: bytes, transcript: bytes, proof: bytes) -> bool:
        return hmac.compare_digest(self.prove(label, transcript), proof)

    @property
    def fingerprint(self) -> str:
        """16 hex digits that identify the key without revealing it."""
        return hmac.new(self._secret, _FINGERPRINT, hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SwarmKey(fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SwarmKey):
            return NotImplemented
        return hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)


_HEX = re.compile(r"[0-9a-fA-F]+")
_B64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")


def parse_swarm_key(data: bytes, source: str) -> SwarmKey:
    """A key from the bytes of a file or variable. A single line of hex or base64 is decoded;
    any other content is the key itself (text with surrounding whitespace stripped, so an
    editor's trailing newline does not split a swarm). `source` names the origin in errors;
    the content never appears in them."""
    try:
        text: str | None = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = None
    if text is not None and not text:
        raise ConfigError(f"the swarm key in {source} is empty; put at least {MIN_KEY_BYTES} "
                          "random bytes there (e.g. `head -c 32 /dev/urandom | base64`)")
    if text is None:
        raw, how = data, "raw bytes"
    elif _HEX.fullmatch(text) and len(text) % 2 == 0:
        raw, how = bytes.fromhex(text), "hex"
    elif _B64.fullmatch(text) and len(text.rstrip("=")) % 4 != 1:
        padded = text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4)
        try:
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"the swarm key in {source} is not valid base64") from None
        how = "base64"
    else:
        raw, how = text.encode("utf-8"), "text"
    if len(raw) < MIN_KEY_BYTES:
        raise ConfigError(
            f"the swarm key in {source} is too short ({len(raw)} bytes as {how}, need at least "
            f"{MIN_KEY_BYTES}); make one with `head -c 32 /dev/urandom | base64 > swarm.key`"
        )
    return SwarmKey(raw)


def load_swarm_key(path: str | os.PathLike[str]) -> SwarmKey:
    """Read a private swarm's key file (>= 16 raw bytes, or one line of hex or base64)."""
    p = Path(path)
    try:
        st = p.stat()
        if st.st_size > MAX_KEY_FILE:
            raise ConfigError(f"swarm key file {p} is {st.st_size} bytes; a key file is small")
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"swarm key file {p} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"swarm key file {p} is a directory") from None
    except PermissionError:
        raise ConfigError(f"swarm key file {p} is not readable by this user") from None
    if st.st_mode & 0o077:
        log.warning("swarm key file %s is readable by other users; run `chmod 600 %s`", p, p)
    return parse_swarm_key(data, f"file {p}")


def swarm_key_from_env_or_file(path: str | None) -> SwarmKey | None:
    """The key from `path` (a CLI flag), else from the file named by $SWARM_KEY_FILE, else from
    $SWARM_KEY itself; None (an open swarm) when none is set."""
    if path:
        return load_swarm_key(path)
    env_file = os.environ.get("SWARM_KEY_FILE")
    if env_file:
        return load_swarm_key(env_file)
    env_key = os.environ.get("SWARM_KEY")
    if env_key:
        return parse_swarm_key(env_key.encode("utf-8"), "the SWARM_KEY environment variable")
    return None


def _coerce_key(swarm_key: SwarmKey | bytes | None) -> SwarmKey | None:
    if swarm_key is None or isinstance(swarm_key, SwarmKey):
        return swarm_key
    return SwarmKey(swarm_key)


# --- certificates and TLS contexts ---------------------------------------------------------------

_CERTS: dict[str, tuple[bytes, bytes]] = {}
_SERVER_CONTEXTS: dict[str, ssl.SSLContext] = {}
_CLIENT_CONTEXTS: dict[str, ssl.SSLContext] = {}


def make_certificate(identity: Identity) -> tuple[bytes, bytes]:
    """(cert_pem, key_pem): a self-signed certificate for the identity's own Ed25519 key, made
    once per identity. Nobody checks its dates or chain; its public key is what counts."""
    cached = _CERTS.get(identity.peer_id)
    if cached is not None:
        return cached
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(identity.private_key, None)  # Ed25519 signs without a separate hash
    )
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pair = (cert.public_bytes(serialization.Encoding.PEM), key_pem)
    _CERTS[identity.peer_id] = pair
    return pair


def _certificate_der(identity: Identity) -> bytes:
    cert_pem, _ = make_certificate(identity)
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def peer_id_of_certificate(der: bytes | None) -> str:
    """The peer id named by a certificate's Ed25519 key; AuthError for anything else."""
    if not der:
        raise AuthError("the remote end presented no certificate")
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        raise AuthError("the remote end presented a malformed certificate") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuthError("the remote certificate's key is not Ed25519: not a swarm peer")
    return peer_id_from_public(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def _load_chain(ctx: ssl.SSLContext, identity: Identity) -> None:
    """`load_cert_chain` only reads files: write them to a private temporary folder, the key
    encrypted under a one-time password, and remove them at once."""
    cert_pem, _ = make_certificate(identity)
    password = secrets.token_bytes(32)
    encrypted = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    with tempfile.TemporaryDirectory(prefix="swarm-tls-") as tmp:  # mode 0700
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, encrypted)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path, password=password)


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # Identity is checked against the peer id by this module, not by a CA chain (see the top).
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_context(identity: Identity) -> ssl.SSLContext:
    """The TLS 1.3 context a peer serves with (cached per identity)."""
    ctx = _SERVER_CONTEXTS.get(identity.peer_id)
    if ctx is None:
        ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
        ctx.num_tickets = 0  # no resumption: every connection shows its certificate afresh
        _load_chain(ctx, identity)
        _SERVER_CONTEXTS[identity.peer_id] = ctx
    return ctx


def client_context(identity: Identity) -> ssl.SSLContext:
    """The TLS 1.3 context a caller connects with (cached per identity). It carries the caller's
    certificate too, though servers do not ask for it: the client proves itself in `Proof`."""
    ctx = _CLIENT_CONTEXTS.get(identity.peer_id)
    if ctx is None:
        ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
        _load_chain(ctx, identity)
        _CLIENT_CONTEXTS[identity.peer_id] = ctx
    return ctx


# --- handshake messages ---------------------------------------------------------------------------


@message
@dataclass(frozen=True)
class Hello(Message):
    """Client -> server, first frame inside TLS: who the client claims to be."""

    TYPE: ClassVar[str] = "sec_hello"
    version: int
    nonce: bytes
    public_key: bytes


@message
@dataclass(frozen=True)
class Challenge(Message):
    """Server -> client: the server's nonce, and its swarm key proof (b"" in an open swarm)."""

    TYPE: ClassVar[str] = "sec_challenge"
    version: int
    nonce: bytes
    key_proof: bytes


@message
@dataclass(frozen=True)
class Proof(Message):
    """Client -> server: the signature over the transcript, and the client's key proof."""

    TYPE: ClassVar[str] = "sec_proof"
    signature: bytes
    key_proof: bytes


@message
@dataclass(frozen=True)
class Welcome(Message):
    """Server -> client: accepted; the stream now belongs to the application."""

    TYPE: ClassVar[str] = "sec_welcome"


def transcript(
    client_nonce: bytes,
    server_nonce: bytes,
    server_cert_der: bytes,
    client_public: bytes,
    channel_binding: bytes,
) -> bytes:
    """SHA-256 over every value both ends must agree on, each length-prefixed so no two
    different transcripts encode alike."""
    h = hashlib.sha256()
    for part in (_CONTEXT, client_nonce, server_nonce, hashlib.sha256(server_cert_der).digest(),
                 client_public, channel_binding):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def _nonce(value: bytes | None) -> bytes:
    return secrets.token_bytes(NONCE_LEN) if value is None else value


class ClientHandshake:
    """The caller's side, sans-IO. Built right after the TLS handshake, from what TLS showed;
    refuses a server with the wrong key before producing any message.

    States: start -> hello_sent -> proof_sent -> done. `receive` takes the server's next
    message and returns the reply to send, or None once accepted.
    """

    def __init__(
        self,
        identity: Identity,
        server_cert_der: bytes | None,
        channel_binding: bytes,
        expected_peer_id: str | None,
        swarm_key: SwarmKey | None,
        *,
        nonce: bytes | None = None,
    ) -> None:
        self.server_peer_id = peer_id_of_certificate(server_cert_der)
        if expected_peer_id is not None and self.server_peer_id != expected_peer_id:
            raise AuthError(
                f"expected peer {short(expected_peer_id)} at this address but "
                f"{short(self.server_peer_id)} answered; refusing it (stale address or impostor)",
                peer=expected_peer_id,
            )
        self._identity = identity
        self._cert_der = server_cert_der or b""
        self._binding = channel_binding
        self._key = swarm_key
        self._nonce = _nonce(nonce)
        self.state = "start"

    def hello(self) -> Hello:
        self._expect("start")
        self.state = "hello_sent"
        return Hello(0, SECURE_VERSION, self._nonce, self._identity.public_bytes)

    def receive(self, msg: Message) -> Message | None:
        peer = self.server_peer_id
        if isinstance(msg, Error):
            raise AuthError(f"peer {short(peer)} refused us: {msg.message}"[:300], peer=peer)
        if self.state == "hello_sent" and isinstance(msg, Challenge):
            if msg.version != SECURE_VERSION:
                raise AuthError(f"peer {short(peer)} speaks secure handshake version "
                                f"{msg.version}, we speak {SECURE_VERSION}; upgrade", peer=peer)
            if len(msg.nonce) != NONCE_LEN:
                raise AuthError(f"peer {short(peer)} sent a bad nonce", peer=peer)
            t = transcript(self._nonce, msg.nonce, self._cert_der, self._identity.public_bytes,
                           self._binding)
            _check_key_proof(self._key, _SERVER_KEY_PROOF, t, msg.key_proof, peer, "peer")
            self.state = "proof_sent"
            key_proof = self._key.prove(_CLIENT_KEY_PROOF, t) if self._key else b""
            return Proof(0, self._identity.sign(_CLIENT_SIGNATURE + t), key_proof)
        if self.state == "proof_sent" and isinstance(msg, Welcome):
            self.state = "done"
            return None
        raise AuthError(f"peer {short(peer)} sent {msg.TYPE!r} in handshake state {self.state}",
                        peer=peer)

    def _expect(self, state: str) -> None:
        if self.state != state:
            raise RuntimeError(f"client handshake is in state {self.state}, not {state}")


class ServerHandshake:
    """The serving side, sans-IO. States: start -> challenged -> done. `receive` takes the
    client's next message and returns the reply; after a valid `Proof` the reply is `Welcome`
    and `client_peer_id` is set. Any failure raises AuthError, whose text may go back to the
    client in an Error frame."""

    def __init__(
        self,
        own_cert_der: bytes,
        channel_binding: bytes,
        swarm_key: SwarmKey | None,
        *,
        nonce: bytes | None = None,
    ) -> None:
        self._cert_der = own_cert_der
        self._binding = channel_binding
        self._key = swarm_key
        self._nonce = _nonce(nonce)
        self._transcript = b""
        self._client_public = b""
        self.client_peer_id: str | None = None
        self.state = "start"

    def receive(self, msg: Message) -> Message:
        if self.state == "start" and isinstance(msg, Hello):
            if msg.version != SECURE_VERSION:
                raise AuthError(f"secure handshake version {msg.version} is not supported "
                                f"(this peer speaks {SECURE_VERSION}); upgrade")
            if len(msg.nonce) != NONCE_LEN or len(msg.public_key) != 32:
                raise AuthError("bad nonce or public key in hello")
            self._client_public = msg.public_key
            self._transcript = transcript(msg.nonce, self._nonce, self._cert_der, msg.public_key,
                                          self._binding)
            self.state = "challenged"
            key_proof = self._key.prove(_SERVER_KEY_PROOF, self._transcript) if self._key else b""
            return Challenge(0, SECURE_VERSION, self._nonce, key_proof)
        if self.state == "challenged" and isinstance(msg, Proof):
            claimed = peer_id_from_public(self._client_public)
            try:
                Ed25519PublicKey.from_public_bytes(self._client_public).verify(
                    msg.signature, _CLIENT_SIGNATURE + self._transcript
                )
            except (InvalidSignature, ValueError):
                raise AuthError("the client's signature does not match its key or this session",
                                peer=claimed) from None
            _check_key_proof(self._key, _CLIENT_KEY_PROOF, self._transcript, msg.key_proof,
                             claimed, "caller")
            self.client_peer_id = claimed
            self.state = "done"
            return Welcome(0)
        raise AuthError(f"unexpected {msg.TYPE!r} in handshake state {self.state}")


def _check_key_proof(
    key: SwarmKey | None, label: bytes, t: bytes, proof: bytes, peer: str, who: str
) -> None:
    """Both ends must agree on whether the swarm is private and, if so, on its key."""
    if key is None:
        if proof:
            raise AuthError(f"{who} {short(peer)} uses a swarm key and this side has none; set "
                            "SWARM_KEY_FILE to the private swarm's key to join it", peer=peer)
        return
    if not proof:
        raise AuthError(f"{who} {short(peer)} has no swarm key and this side is in a private "
                        "swarm; give both the same key (SWARM_KEY_FILE)", peer=peer)
    if not key.check(label, t, proof):
        raise AuthError(f"{who} {short(peer)} holds a different swarm key (compare "
                        "`SwarmKey.fingerprint` on both machines)", peer=peer)


# --- the asyncio layer ----------------------------------------------------------------------------


def _tls_facts(writer: asyncio.StreamWriter) -> tuple[ssl.SSLObject, bytes]:
    """The stream's TLS object and channel binding; refuses anything but TLS 1.3."""
    so = writer.get_extra_info("ssl_object")
    if so is None:
        raise ConfigError("secure handshake on a plain stream: open it with "
                          "client_context()/server_context()")
    if so.version() != "TLSv1.3":
        raise AuthError(f"the connection negotiated {so.version()}, not TLSv1.3")
    binding = so.get_channel_binding("tls-unique")
    if not binding:
        raise AuthError("this TLS library gives no channel binding; cannot bind the handshake")
    return so, binding


async def _read_message(reader: asyncio.StreamReader) -> Message:
    header = await reader.readexactly(HEADER.size)
    (n,) = HEADER.unpack(header)
    if n > MAX_HANDSHAKE_FRAME:
        raise AuthError(f"handshake frame of {n} bytes exceeds {MAX_HANDSHAKE_FRAME}")
    try:
        return decode_body(await reader.readexactly(n))
    except ProtocolError as e:
        raise AuthError(f"garbage in the handshake: {e}") from None


async def _send(writer: asyncio.StreamWriter, msg: Message) -> None:
    writer.write(encode(msg))
    await writer.drain()


async def _bounded(coro: Awaitable[str], timeout: float, what: str) -> str:
    """One deadline for the whole exchange; transport failures become PeerUnavailable."""
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise PeerUnavailable(f"{what} timed out after {timeout:g} s") from None
    except asyncio.IncompleteReadError:
        raise PeerUnavailable(f"the other end closed the connection during the {what}") from None
    except (ConnectionError, ssl.SSLError) as e:
        raise PeerUnavailable(f"{what} failed: {type(e).__name__}: {e}"[:300]) from None


async def client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: Identity,
    expected_peer_id: str | None,
    swarm_key: SwarmKey | bytes | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Run the caller's side on a fresh TLS stream; the server's verified peer id. Nothing is
    written before the server's key matched `expected_peer_id` (None: accept any, e.g. a
    bootstrap address). AuthError on refusal, PeerUnavailable on timeout or a dropped link."""
    key = _coerce_key(swarm_key)

    async def run() -> str:
        so, binding = _tls_facts(writer)
        hs = ClientHandshake(identity, so.getpeercert(binary_form=True), binding,
                             expected_peer_id, key)
        reply: Message | None = hs.hello()
        while reply is not None:
            await _send(writer, reply)
            reply = hs.receive(await _read_message(reader))
        return hs.server_peer_id

    return await _bounded(run(), timeout, "secure handshake")


async def server_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: Identity,
    swarm_key: SwarmKey | bytes | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Run the serving side on an accepted TLS stream; the client's verified peer id. On an
    AuthError the client is told why in an Error frame before the error is raised."""
    key = _coerce_key(swarm_key)

    async def run() -> str:
        _, binding = _tls_facts(writer)
        hs = ServerHandshake(_certificate_der(identity), binding, key)
        while hs.client_peer_id is None:
            msg = await _read_message(reader)
            try:
                reply = hs.receive(msg)
            except AuthError as e:
                await _send(writer, Error(0, "auth", str(e)))
                raise
            await _send(writer, reply)
        return hs.client_peer_id

    return await _bounded(run(), timeout, "secure handshake")


async def _close(writer: asyncio.StreamWriter, grace: float = 1.0) -> None:
    """Close politely (TLS close_notify), but never wait on the other end for long."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), grace)
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:  # a timeout or a broken link: the connection is over either way
        writer.transport.abort()


async def open_secure_connection(
    host: str,
    port: int,
    identity: Identity,
    expected_peer_id: str | None,
    swarm_key: SwarmKey | bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Connect, run TLS 1.3 and the handshake within `timeout` in all; (reader, writer,
    remote peer id). On any failure the connection is closed and the error raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    where = f"{host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=client_context(identity),
                                    ssl_handshake_timeout=timeout),
            timeout,
        )
    except asyncio.TimeoutError:
        raise PeerUnavailable(f"connecting to {where} timed out after {timeout:g} s",
                              peer=expected_peer_id) from None
    except ssl.SSLError as e:
        raise PeerUnavailable(f"TLS with {where} failed ({e.reason or e}); is it a swarm peer?",
                              peer=expected_peer_id) from None
    except OSError as e:
        raise PeerUnavailable(f"cannot reach {where}: {e.strerror or e}",
                              peer=expected_peer_id) from None
    try:
        remaining = max(deadline - loop.time(), 0.001)
        peer = await client_handshake(reader, writer, identity, expected_peer_id, swarm_key,
                                      timeout=remaining)
    except BaseException:
        await _close(writer)
        raise
    return reader, writer, peer


async def accept_secure(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: Identity,
    swarm_key: SwarmKey | bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Call first thing in a `start_server(..., ssl=server_context(identity))` callback: the
    caller's verified peer id. On any failure the connection is closed and the error raised."""
    try:
        return await server_handshake(reader, writer, identity, swarm_key, timeout=timeout)
    except BaseException:
        await _close(writer)
        raise


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]]


async def start_secure_server(
    handler: Handler,
    host: str,
    port: int,
    identity: Identity,
    swarm_key: SwarmKey | bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> asyncio.Server:
    """`asyncio.start_server` with TLS 1.3 and the handshake in front of `handler(reader,
    writer, remote_peer_id)`. A caller that fails TLS or the handshake, or takes longer than
    `timeout` for either, is dropped and never reaches the handler."""
    key = _coerce_key(swarm_key)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        try:
            peer = await accept_secure(reader, writer, identity, key, timeout)
        except RemoteError as e:
            log.info("refused connection from %s: %s", addr, e)
            return
        try:
            await handler(reader, writer, peer)
        finally:
            if not writer.is_closing():
                writer.close()

    return await asyncio.start_server(
        on_connect, host, port, ssl=server_context(identity), ssl_handshake_timeout=timeout
    )
