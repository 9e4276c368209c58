"""Secure transport: the sans-IO handshake cores, key loading, and real TLS on 127.0.0.1.

Every network test runs under `_run`, which bounds the whole test; servers bind port 0.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from pathlib import Path
from typing import Any, Awaitable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from swarm.errors import ConfigError, PeerUnavailable, RemoteError
from swarm.identity import Identity
from swarm.secure import (
    AuthError,
    Challenge,
    ClientHandshake,
    Hello,
    Proof,
    ServerHandshake,
    SwarmKey,
    Welcome,
    accept_secure,
    client_context,
    load_swarm_key,
    make_certificate,
    open_secure_connection,
    peer_id_of_certificate,
    server_context,
    start_secure_server,
    swarm_key_from_env_or_file,
)
from swarm.wire import HEADER, encode

HOST = "127.0.0.1"
KEY_BYTES = b"\x01" * 8 + b"swarm-secret-key-material"
KEY_TEXT = KEY_BYTES.hex()


def _run(coro: Awaitable[Any], limit: float = 15.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, limit)

    return asyncio.run(bounded())


def _der(identity: Identity) -> bytes:
    cert_pem, _ = make_certificate(identity)
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def _port(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


async def _echo_server(
    identity: Identity, key: SwarmKey | None = None, timeout: float = 5.0
) -> tuple[asyncio.Server, list[str]]:
    """A secure server whose handler echoes one line per connection and records the peer."""
    seen: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        seen.append(peer)
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        writer.write(await reader.readline())
        await writer.drain()

    server = await start_secure_server(handler, HOST, 0, identity, key, timeout)
    return server, seen


async def _capturing_server(
    identity: Identity, key: SwarmKey | None, timeout: float = 5.0
) -> tuple[asyncio.Server, "asyncio.Future[Any]"]:
    """A server that runs `accept_secure` and hands back its result or exception."""
    outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = await accept_secure(reader, writer, identity, key, timeout)
        except Exception as e:  # the test inspects it
            if not outcome.done():
                outcome.set_result(e)
            return
        if not outcome.done():
            outcome.set_result(peer)
        writer.close()

    server = await asyncio.start_server(cb, HOST, 0, ssl=server_context(identity))
    return server, outcome


# --- certificates ---------------------------------------------------------------------------------


def test_certificate_is_bound_to_identity_and_cached() -> None:
    ident = Identity.generate()
    first = make_certificate(ident)
    assert make_certificate(ident) is first
    assert peer_id_of_certificate(_der(ident)) == ident.peer_id
    assert b"PRIVATE KEY" in first[1]
    with pytest.raises(AuthError):
        peer_id_of_certificate(None)
    with pytest.raises(AuthError):
        peer_id_of_certificate(b"not a certificate")


def test_contexts_require_tls13() -> None:
    ident = Identity.generate()
    for ctx in (server_context(ident), client_context(ident)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server_context(ident) is server_context(ident)


# --- the sans-IO cores ----------------------------------------------------------------------------


def _pair(
    client_id: Identity,
    server_id: Identity,
    *,
    shown_cert: bytes | None = None,
    client_binding: bytes = b"B" * 48,
    server_binding: bytes = b"B" * 48,
    client_key: SwarmKey | None = None,
    server_key: SwarmKey | None = None,
) -> tuple[ClientHandshake, ServerHandshake]:
    server = ServerHandshake(_der(server_id), server_binding, server_key)
    cert = _der(server_id) if shown_cert is None else shown_cert
    client = ClientHandshake(client_id, cert, client_binding, None, client_key)
    return client, server


def _drive(client: ClientHandshake, server: ServerHandshake) -> str:
    challenge = server.receive(client.hello())
    proof = client.receive(challenge)
    assert isinstance(proof, Proof)
    welcome = server.receive(proof)
    assert client.receive(welcome) is None
    assert server.client_peer_id is not None
    return server.client_peer_id


def test_cores_agree_and_return_both_ids() -> None:
    c, s = Identity.generate(), Identity.generate()
    client, server = _pair(c, s)
    assert _drive(client, server) == c.peer_id
    assert client.server_peer_id == s.peer_id


def test_core_client_refuses_unexpected_key_before_any_message() -> None:
    c, s, other = Identity.generate(), Identity.generate(), Identity.generate()
    with pytest.raises(AuthError, match="expected peer"):
        ClientHandshake(c, _der(s), b"B" * 48, other.peer_id, None)


def test_relayed_proof_is_refused_by_the_real_server() -> None:
    """A relay shows the client its own certificate and forwards the real server's nonce: the
    client's proof is bound to the relay's certificate, so the real server refuses it."""
    c, real, relay = Identity.generate(), Identity.generate(), Identity.generate()
    client, server = _pair(c, real, shown_cert=_der(relay))
    challenge = server.receive(client.hello())
    proof = client.receive(challenge)
    assert isinstance(proof, Proof)
    with pytest.raises(AuthError, match="signature"):
        server.receive(proof)


def test_proof_from_another_tls_session_is_refused() -> None:
    c, s = Identity.generate(), Identity.generate()
    client, server = _pair(c, s, client_binding=b"A" * 48, server_binding=b"B" * 48)
    proof = client.receive(server.receive(client.hello()))
    with pytest.raises(AuthError):
        server.receive(proof)  # type: ignore[arg-type]


def test_replayed_transcript_is_refused() -> None:
    """A recorded Hello+Proof replayed against a fresh server nonce fails."""
    c, s = Identity.generate(), Identity.generate()
    client, server = _pair(c, s)
    hello = client.hello()
    proof = client.receive(server.receive(hello))
    replay = ServerHandshake(_der(s), b"B" * 48, None)
    replay.receive(hello)
    with pytest.raises(AuthError):
        replay.receive(proof)  # type: ignore[arg-type]


def test_core_out_of_order_messages_are_refused() -> None:
    c, s = Identity.generate(), Identity.generate()
    client, server = _pair(c, s)
    with pytest.raises(AuthError, match="state"):
        server.receive(Proof(0, b"x" * 64, b""))
    with pytest.raises(AuthError, match="state"):
        client.receive(Welcome(0))  # no hello sent yet
    with pytest.raises(AuthError, match="version"):
        ServerHandshake(_der(s), b"B" * 48, None).receive(Hello(0, 99, b"n" * 32, c.public_bytes))


@pytest.mark.parametrize(
    "client_key,server_key,match",
    [
        (KEY_BYTES, None, "has no swarm key"),
        (None, KEY_BYTES, "this side has none"),
        (KEY_BYTES, b"another-swarm-key-entirely!", "different swarm key"),
    ],
    ids=["server-without", "client-without", "wrong-key"],
)
def test_core_swarm_key_mismatch(client_key: bytes | None, server_key: bytes | None, match: str) -> None:
    c, s = Identity.generate(), Identity.generate()
    ck = SwarmKey(client_key) if client_key else None
    sk = SwarmKey(server_key) if server_key else None
    client, server = _pair(c, s, client_key=ck, server_key=sk)
    challenge = server.receive(client.hello())
    with pytest.raises(AuthError, match=match) as info:
        client.receive(challenge)  # the client checks the server's proof first
    assert KEY_TEXT not in str(info.value)


def test_core_server_refuses_client_without_key() -> None:
    """A client that skips the check (or lies) still cannot get past a keyed server."""
    c, s = Identity.generate(), Identity.generate()
    client, server = _pair(c, s, client_key=None, server_key=SwarmKey(KEY_BYTES))
    hello = client.hello()
    challenge = server.receive(hello)
    assert isinstance(challenge, Challenge)
    forged = Proof(0, b"\0" * 64, b"")
    with pytest.raises(AuthError):
        server.receive(forged)


def test_core_same_swarm_key_ok() -> None:
    c, s = Identity.generate(), Identity.generate()
    client, server = _pair(c, s, client_key=SwarmKey(KEY_BYTES), server_key=SwarmKey(KEY_BYTES))
    assert _drive(client, server) == c.peer_id


# --- the swarm key --------------------------------------------------------------------------------


def test_swarm_key_repr_hides_secret() -> None:
    key = SwarmKey(KEY_BYTES)
    for text in (repr(key), str(key), f"{key}", repr({"key": key})):
        assert KEY_TEXT not in text and "swarm-secret" not in text
    assert len(key.fingerprint) == 16 and key.fingerprint in repr(key)
    assert key == SwarmKey(KEY_BYTES) and key != SwarmKey(KEY_BYTES + b"x")


def test_load_swarm_key_formats(tmp_path: Path) -> None:
    raw = os.urandom(32)
    expected = SwarmKey(raw)
    files = {
        "raw": raw,
        "hex": raw.hex().encode() + b"\n",
        "b64": base64.b64encode(raw) + b"\n",
        "urlsafe": base64.urlsafe_b64encode(raw).rstrip(b"="),
    }
    for name, data in files.items():
        p = tmp_path / name
        p.write_bytes(data)
        p.chmod(0o600)
        assert load_swarm_key(p) == expected, name
    phrase = tmp_path / "phrase"
    phrase.write_bytes(b"a long shared passphrase for the lab\n")
    assert load_swarm_key(phrase) == SwarmKey(b"a long shared passphrase for the lab")


@pytest.mark.parametrize("data", [b"", b"\n  \n", b"0123abcd", b"c2hvcnQ=", b"short key"])
def test_load_swarm_key_rejects_empty_or_short(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "key"
    p.write_bytes(data)
    with pytest.raises(ConfigError, match="empty|too short") as info:
        load_swarm_key(p)
    if data.strip():
        assert data.strip().decode() not in str(info.value)


def test_load_swarm_key_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_swarm_key(tmp_path / "nope")


def test_swarm_key_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_KEY", raising=False)
    monkeypatch.delenv("SWARM_KEY_FILE", raising=False)
    assert swarm_key_from_env_or_file(None) is None
    monkeypatch.setenv("SWARM_KEY", KEY_TEXT)
    assert swarm_key_from_env_or_file(None) == SwarmKey(KEY_BYTES)
    other = tmp_path / "other"
    other.write_bytes(b"\x02" * 32)
    monkeypatch.setenv("SWARM_KEY_FILE", str(other))
    assert swarm_key_from_env_or_file(None) == SwarmKey(b"\x02" * 32)  # the file beats the value
    flag = tmp_path / "flag"
    flag.write_bytes(b"\x03" * 32)
    assert swarm_key_from_env_or_file(str(flag)) == SwarmKey(b"\x03" * 32)  # the flag beats both
    monkeypatch.delenv("SWARM_KEY_FILE")
    monkeypatch.setenv("SWARM_KEY", "abcdef")
    with pytest.raises(ConfigError, match="SWARM_KEY") as info:
        swarm_key_from_env_or_file(None)
    assert "abcdef" not in str(info.value)


# --- real TLS on loopback -------------------------------------------------------------------------


def test_good_handshake_both_ways_and_data_flows() -> None:
    async def main() -> None:
        c, s = Identity.generate(), Identity.generate()
        server, seen = await _echo_server(s)
        async with server:
            reader, writer, peer = await open_secure_connection(HOST, _port(server), c, s.peer_id)
            assert peer == s.peer_id
            so = writer.get_extra_info("ssl_object")
            assert so.version() == "TLSv1.3"
            writer.write(b"hello over tls\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.readline(), 5) == b"hello over tls\n"
            assert seen == [c.peer_id]
            writer.close()
            # a bootstrap caller that knows only the address learns the id
            _, w2, peer2 = await open_secure_connection(HOST, _port(server), c, None)
            assert peer2 == s.peer_id
            w2.close()

    _run(main())


def test_wrong_server_key_refused_and_client_sent_nothing() -> None:
    async def main() -> None:
        c, expected, impostor = Identity.generate(), Identity.generate(), Identity.generate()
        received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                data = await asyncio.wait_for(reader.read(), 5)
            except (ConnectionError, ssl.SSLError):
                data = b""
            received.set_result(data)
            writer.close()

        server = await asyncio.start_server(cb, HOST, 0, ssl=server_context(impostor))
        async with server:
            with pytest.raises(AuthError, match="expected peer") as info:
                await open_secure_connection(HOST, _port(server), c, expected.peer_id)
            assert isinstance(info.value, RemoteError)
            assert await asyncio.wait_for(received, 5) == b""  # not one application byte

    _run(main())


def test_plain_tcp_caller_refused_server_keeps_serving() -> None:
    async def main() -> None:
        c, s = Identity.generate(), Identity.generate()
        server, seen = await _echo_server(s, timeout=2.0)
        async with server:
            reader, writer = await asyncio.open_connection(HOST, _port(server))
            writer.write(encode(Hello(0, 1, b"n" * 32, c.public_bytes)) + b"GET / HTTP/1.0\r\n\r\n")
            await writer.drain()
            try:
                reply = await asyncio.wait_for(reader.read(), 5)
            except ConnectionError:
                reply = b""
            assert b"sec_" not in reply  # whatever came back was a TLS alert, not our protocol
            writer.close()
            assert seen == []
            _, w2, peer = await open_secure_connection(HOST, _port(server), c, s.peer_id)
            assert peer == s.peer_id and seen == [c.peer_id]
            w2.close()

    _run(main())


def test_garbage_inside_tls_refused() -> None:
    async def main() -> None:
        c, s = Identity.generate(), Identity.generate()
        server, outcome = await _capturing_server(s, None)
        async with server:
            reader, writer = await asyncio.open_connection(HOST, _port(server), ssl=client_context(c))
            writer.write(HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1")
            await writer.drain()
            err = await asyncio.wait_for(outcome, 5)
            assert isinstance(err, AuthError) and "garbage" in str(err)
            writer.close()

    _run(main())


async def _trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()
        await asyncio.sleep(every)


async def _time_until_dropped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              data: bytes) -> float:
    start = time.monotonic()
    trickler = asyncio.create_task(_trickle(writer, data, 1.0))
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(4096), 8)
            if not chunk:
                break
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        trickler.cancel()
        try:
            await trickler
        except (asyncio.CancelledError, ConnectionError, ssl.SSLError):
            pass
        writer.transport.abort()
    return time.monotonic() - start


def test_byte_per_second_caller_dropped_during_tls() -> None:
    async def main() -> None:
        s = Identity.generate()
        server, seen = await _echo_server(s, timeout=1.5)
        async with server:
            reader, writer = await asyncio.open_connection(HOST, _port(server))
            # a TLS record header announcing a ClientHello, then one byte a second
            elapsed = await _time_until_dropped(reader, writer, b"\x16\x03\x01\x02\x00" + b"\x01" * 50)
            assert elapsed < 4.0
            assert seen == []

    _run(main())


def test_byte_per_second_caller_dropped_after_tls() -> None:
    async def main() -> None:
        c, s = Identity.generate(), Identity.generate()
        server, outcome = await _capturing_server(s, None, timeout=1.5)
        async with server:
            reader, writer = await asyncio.open_connection(HOST, _port(server), ssl=client_context(c))
            hello = encode(Hello(0, 1, b"n" * 32, c.public_bytes))
            elapsed = await _time_until_dropped(reader, writer, hello)
            assert elapsed < 4.0
            err = await asyncio.wait_for(outcome, 5)
            assert isinstance(err, PeerUnavailable) and "timed out" in str(err)

    _run(main())


def test_swarm_key_same_key_connects() -> None:
    async def main() -> None:
        c, s = Identity.generate(), Identity.generate()
        server, seen = await _echo_server(s, SwarmKey(KEY_BYTES))
        async with server:
            reader, writer, peer = await open_secure_connection(
                HOST, _port(server), c, s.peer_id, SwarmKey(KEY_BYTES)
            )
            writer.write(b"private\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"private\n"
            assert peer == s.peer_id and seen == [c.peer_id]
            writer.close()

    _run(main())


@pytest.mark.parametrize(
    "client_key,server_key",
    [(None, KEY_BYTES), (KEY_BYTES, None), (KEY_BYTES, b"\x07" * 32)],
    ids=["client-without", "server-without", "wrong-key"],
)
def test_swarm_key_mismatch_refused_both_sides(client_key: bytes | None, server_key: bytes | None) -> None:
    async def main() -> None:
        c, s = Identity.generate(), Identity.generate()
        sk = SwarmKey(server_key) if server_key else None
        ck = SwarmKey(client_key) if client_key else None
        server, outcome = await _capturing_server(s, sk)
        async with server:
            with pytest.raises(AuthError) as info:
                await open_secure_connection(HOST, _port(server), c, s.peer_id, ck)
            server_side = await asyncio.wait_for(outcome, 5)
            assert isinstance(server_side, RemoteError)  # the server refused too
            for err in (info.value, server_side):
                for text in (str(err), repr(err)):
                    assert KEY_TEXT not in text and "swarm-secret" not in text

    _run(main())


def test_swarm_key_server_refuses_keyless_caller_that_ignores_the_check() -> None:
    """A client that does not stop at the server's key proof still gets an Error and a close."""
    async def main() -> None:
        c, s = Identity.generate(), Identity.generate()
        server, outcome = await _capturing_server(s, SwarmKey(KEY_BYTES))
        async with server:
            reader, writer = await asyncio.open_connection(HOST, _port(server), ssl=client_context(c))
            writer.write(encode(Hello(0, 1, os.urandom(32), c.public_bytes)))
            writer.write(encode(Proof(0, b"\0" * 64, b"")))
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 5)
            assert b"auth" in rest and KEY_TEXT.encode() not in rest
            assert isinstance(await asyncio.wait_for(outcome, 5), AuthError)
            writer.close()

    _run(main())
