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


def test_a_frame_is_exactly_the_documented_msgpack_map() -> None:
    """Pins the format byte for byte: `t`, then the fields in declaration order, tensors as raw
    little-endian bytes in C order (strided and half-precision tensors included)."""
    import struct

    h = torch.arange(6, dtype=torch.float32).reshape(2, 3).t().unsqueeze(0)  # [1, 3, 2], strided
    c = torch.arange(4, dtype=torch.float32).reshape(1, 1, 4).half()
    msg = wire.Forward(7, session=3, position=11, hidden=h, next=(wire.NextHop("pabc", 5, b"k" * 4),),
                       token=b"t" * 4, carried=(c,))
    expected = msgpack.packb({
        "t": "forward", "id": 7, "session": 3, "position": 11,
        "hidden": {"dtype": "float32", "shape": [1, 3, 2], "data": struct.pack("<6f", 0, 3, 1, 4, 2, 5)},
        "next": [{"peer": "pabc", "session": 5, "token": b"k" * 4}],
        "token": b"t" * 4,
        "carried": [{"dtype": "float16", "shape": [1, 1, 4], "data": struct.pack("<4e", 0, 1, 2, 3)}],
    }, use_bin_type=True)
    assert wire.encode(msg) == wire.HEADER.pack(len(expected)) + expected
    bf = torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16)
    assert wire.tensor_to_wire(bf) == {"dtype": "bfloat16", "shape": [1, 2], "data": b"\x80\x3f\x00\xc0"}
    grad = torch.ones(1, 2, requires_grad=True)
    assert wire.tensor_to_wire(grad)["data"] == struct.pack("<2f", 1, 1)
    assert wire.tensor_to_wire(torch.empty(0, 3)) == {"dtype": "float32", "shape": [0, 3], "data": b""}
    with pytest.raises(ProtocolError, match="cannot travel on the wire"):
        wire.tensor_to_wire(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_received_tensor_is_a_writable_copy_of_the_frame(dtype: torch.dtype) -> None:
    h = torch.randn(1, 2, 3).to(dtype)
    body = wire.encode(wire.ForwardResult(1, hidden=h, carried=(h,)))[4:]
    before = bytes(body)
    got = wire.decode_body(body)
    assert isinstance(got, wire.ForwardResult)
    assert got.hidden.dtype == dtype and got.hidden.shape == (1, 2, 3) and got.hidden.is_contiguous()
    assert torch.equal(got.hidden, h) and torch.equal(got.carried[0], h)
    got.hidden.add_(1)  # writable (no warning, no error) and private
    assert body == before and torch.equal(got.carried[0], h)


def test_declared_types_are_checked_with_the_same_messages() -> None:
    with pytest.raises(ProtocolError, match=r"^f\[1\]: expected an integer$"):
        wire._check(tuple[int, ...], [1, "x"], "f")
    assert wire._check(tuple[int, ...], [1, 2], "f") == (1, 2)
    assert wire._check(float, 2, "f") == 2.0 and type(wire._check(float, 2, "f")) is float
    assert wire._check(bytes, bytearray(b"ab"), "f") == b"ab"
    assert wire._check(int | None, None, "f") is None
    with pytest.raises(ProtocolError, match=r"^f: expected an integer$"):
        wire._check(int | None, "x", "f")
    with pytest.raises(ProtocolError, match=r"^f: expected a map$"):
        wire._check(wire.NextHop, [], "f")
    body = wire.ForwardResult(1, hidden=torch.zeros(1, 1)).to_wire()
    body["carried"] = [body["hidden"], {"dtype": "float32", "shape": [1, 2], "data": b"\0" * 4}]
    with pytest.raises(ProtocolError, match=r"field 'result.carried\[1\]': 4 bytes do not match shape \[1, 2\]"):
        wire.decode_body(msgpack.packb(body, use_bin_type=True))
    with pytest.raises(TypeError, match="unsupported field type"):
        wire._check(set, [], "f")
