"""The wire codec alone: exact round trips, tolerance for unknown fields, and one invariant for any
input at all — it parses, or it raises the protocol's own error."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peers.transfer  # noqa: F401  (registers the block-transfer messages)
import swarm.gossip  # noqa: F401  (registers the gossip messages)
import swarm.secure  # noqa: F401  (registers the handshake messages)
from swarm import wire
from swarm.errors import ProtocolError


def roundtrip(msg: wire.Message) -> wire.Message:
    frame = wire.encode(msg)
    n = wire.frame_length(frame[:4], wire.DEFAULT_MAX_FRAME)
    assert n == len(frame) - 4
    return wire.decode_body(frame[4:])


def test_messages_round_trip_exactly() -> None:
    h = torch.randn(1, 3, 8)
    got = roundtrip(wire.Forward(7, session=3, position=11, hidden=h))
    assert isinstance(got, wire.Forward) and (got.id, got.session, got.position) == (7, 3, 11)
    assert torch.equal(got.hidden, h) and got.hidden.dtype == torch.float32
    bf = torch.randn(1, 2, 4).to(torch.bfloat16)
    assert torch.equal(roundtrip(wire.ForwardResult(1, hidden=bf)).hidden, bf)
    assert roundtrip(wire.Error(2, "overloaded", "full")) == wire.Error(2, "overloaded", "full")
    assert roundtrip(wire.OpenSession(4, start=0, end=5, max_length=64)).dtype == "float32"


def test_unknown_fields_are_ignored_and_missing_ones_named() -> None:
    body = msgpack.packb({"t": "close", "id": 9, "session": 2, "from_the_future": [1, 2]})
    assert wire.decode_body(body) == wire.CloseSession(9, session=2)
    with pytest.raises(ProtocolError, match="close: missing field 'session'"):
        wire.decode_body(msgpack.packb({"t": "close", "id": 9}))
    with pytest.raises(ProtocolError, match="close.session: expected an integer"):
        wire.decode_body(msgpack.packb({"t": "close", "id": 9, "session": True}))


def test_tensors_are_checked_against_their_shape_and_dtype() -> None:
    ok = {"dtype": "float32", "shape": [1, 2], "data": b"\0" * 8}
    assert wire.tensor_from_wire(ok).shape == (1, 2)
    for bad, why in [
        ({**ok, "data": b"\0" * 7}, "do not match shape"),
        ({**ok, "dtype": "float64"}, "not allowed"),
        ({**ok, "dtype": {}}, "not allowed"),
        ({**ok, "shape": [1, -2]}, "shape"),
        ({**ok, "shape": [1, 1, 1, 1, 1]}, "shape"),
        ([1, 2], "tensor map"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            wire.tensor_from_wire(bad)


def test_a_frame_longer_than_the_limit_is_refused_before_its_body() -> None:
    with pytest.raises(ProtocolError) as e:
        wire.frame_length(wire.HEADER.pack(2**32 - 1), 1024)
    assert e.value.fatal and "exceeds the limit of 1024 bytes" in str(e.value)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_tags = st.sampled_from(sorted(wire._REGISTRY)) | st.text(max_size=6)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64) | st.builds(lambda t, d: msgpack.packb({"t": t, "id": 1, **d}), _tags, st.dictionaries(st.text(max_size=8), _values, max_size=5)))
def test_any_bytes_parse_or_raise_the_protocols_own_error(body: bytes) -> None:
    try:
        msg = wire.decode_body(body)
    except ProtocolError:
        return
    assert isinstance(msg, wire.Message)


def test_a_push_names_its_hops_and_carries_rows() -> None:
    h = torch.randn(1, 2, 8)
    m = roundtrip(wire.Forward(9, session=1, position=4, hidden=h, next=(wire.NextHop("pabc", 7, b"t" * 16),),
                               token=b"k" * 16, carried=(h, h * 2)))
    assert m.next == (wire.NextHop("pabc", 7, b"t" * 16),) and m.token == b"k" * 16
    assert torch.equal(m.carried[1], h * 2)
    plain = roundtrip(wire.Forward(9, session=1, position=4, hidden=h))  # an older peer's frame
    assert plain.next == () and plain.token == b"" and plain.carried == ()
    body = wire.Forward(9, session=1, position=4, hidden=h).to_wire()
    body["next"] = [{"peer": "pabc", "session": "seven", "token": b""}]
    with pytest.raises(ProtocolError, match=r"forward.next\[0\].session: expected an integer"):
        wire.decode_body(msgpack.packb(body, use_bin_type=True))
    body["next"] = [{"peer": "pabc", "session": 7}]
    with pytest.raises(ProtocolError, match="missing field 'token'"):
        wire.decode_body(msgpack.packb(body, use_bin_type=True))
