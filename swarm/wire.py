"""The wire format, sans-IO: bytes in, messages out, and back.

Rules of the format:

* A frame is a 4-byte big-endian body length, then a msgpack body. A body longer than the
  receiver's `max_frame` is refused before it is buffered (the connection is closed: its stream
  can no longer be trusted).
* The body is a map with a type tag `t`, a request id `id` and the message's fields. Fields the
  receiver does not know are ignored, so old and new peers interoperate; a missing or wrongly
  typed field is a `ProtocolError` naming it.
* A tensor is a map `{dtype, shape, data}` with raw little-endian bytes. The dtype comes from an
  allow-list and the byte count must equal the shape's. Nothing is ever unpickled.

Nothing here touches a socket (like h11): `frame_length`, `decode_body` and `encode` take and give
bytes; `swarm.transport` reads them off the stream.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Union

import msgpack
import numpy as np
import torch

from .errors import ProtocolError

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 16 * 1024 * 1024  # a 2k-token prompt of a 4k-wide model in float16 fits

#: dtypes a tensor may carry on the wire; nothing else is accepted
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
MAX_TENSOR_DIMS = 4
# msgpack containers: a frame may hold at most this many elements in one container
_MAX_CONTAINER = 100_000

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("swarm's wire format assumes a little-endian host")


# --- tensors -------------------------------------------------------------------------------------

_DTYPE_NAMES: dict[torch.dtype, str] = {d: name for name, d in WIRE_DTYPES.items()}
# numpy twins of the wire dtypes; bfloat16 has none and takes torch's own (slower) paths
_NUMPY_DTYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise ProtocolError(f"dtype {dtype} cannot travel on the wire")
    return name


def tensor_to_wire(t: torch.Tensor) -> dict[str, Any]:
    dtype = t.dtype
    name = _dtype_name(dtype)
    if dtype is not torch.bfloat16 and t.is_cpu and not t.requires_grad:
        # The common case, with one torch call instead of four: numpy's tobytes copies in C order
        # whatever the strides, the very bytes .contiguous() gives. Every torch call costs several
        # microseconds with cold caches, as on a decode step (measured cold: 21 vs 32 us).
        a = t.numpy()
        if a.ndim:  # a 0-dim tensor fails below, with torch's own error, as it always has
            return {"dtype": name, "shape": list(a.shape), "data": a.tobytes()}
    t = t.detach().to("cpu").contiguous()  # numpy has no bfloat16: its bytes via a uint8 view
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": name, "shape": list(t.shape), "data": data}


def tensor_from_wire(obj: Any, field: str = "tensor") -> torch.Tensor:
    if not isinstance(obj, dict):
        raise ProtocolError(f"field {field!r}: expected a tensor map {{dtype, shape, data}}")
    dtype_name, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        raise ProtocolError(
            f"field {field!r}: dtype {dtype_name!r} not allowed (allowed: {', '.join(WIRE_DTYPES)})"
        )
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_TENSOR_DIMS:
        raise ProtocolError(f"field {field!r}: shape must be 1 to {MAX_TENSOR_DIMS} sizes >= 0")
    numel = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= 1 << 31:
            raise ProtocolError(f"field {field!r}: shape must be 1 to {MAX_TENSOR_DIMS} sizes >= 0")
        numel *= d
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"field {field!r}: data must be bytes")
    dtype = WIRE_DTYPES[dtype_name]
    expected = numel * dtype.itemsize
    if len(data) != expected:
        raise ProtocolError(
            f"field {field!r}: {len(data)} bytes do not match shape {shape} of {dtype_name} "
            f"({expected} bytes)"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # A private, writable copy, never a view of the received frame. Shaping it in numpy, then one
    # torch call, is the cheapest way measured (cold 28 vs 38 us, hot 0.8 vs 1.8 us for
    # torch.frombuffer + reshape); numpy has no bfloat16, which takes torch's way.
    np_dtype = _NUMPY_DTYPES.get(dtype_name)
    if np_dtype is not None:
        return torch.from_numpy(np.ndarray(shape, np_dtype, bytearray(data)))
    return torch.frombuffer(bytearray(data), dtype=dtype).view(*shape)


# --- messages ------------------------------------------------------------------------------------
#
# Encoding and decoding run four times per generated token in every process of a chain, so the
# per-class work (dataclass fields, type hints, what checks each declared type needs) is done once
# per class, lazily (a message class may be declared after this module, by another), and cached.

_REGISTRY: dict[str, type["Message"]] = {}

#: checks one received value against a declared type; the name is for the error message
Checker = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Message:
    """Base of every frame. `id` pairs a reply with its request (0 for unsolicited frames)."""

    TYPE: ClassVar[str] = ""
    id: int

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"t": self.TYPE}
        for name in _field_names(type(self)):
            body[name] = _to_wire(getattr(self, name))
        return body

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> "Message":
        kwargs = {}
        for name, check, required, qualified in _decoder(cls):
            if name not in body:
                if not required:
                    continue
                raise ProtocolError(f"{cls.TYPE}: missing field {name!r}")
            kwargs[name] = check(body[name], qualified)
        return cls(**kwargs)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """A dataclass's field names in declaration order (cached: dataclasses.fields is slow)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


#: runtime types `_to_wire` passes through unchanged: a set lookup instead of three checks
_PLAIN = frozenset({int, float, bool, str, bytes, bytearray, dict, list, type(None)})


def _to_wire(v: Any) -> Any:
    """A field's value as msgpack data. Follows the value's runtime type, not the declared one."""
    tp = type(v)
    if tp in _PLAIN:
        return v
    if isinstance(v, torch.Tensor):
        return tensor_to_wire(v)
    if isinstance(v, tuple):
        return [_to_wire(x) for x in v]
    if dataclasses.is_dataclass(v):
        cls = v if isinstance(v, type) else tp  # as dataclasses.fields does
        return {name: _to_wire(getattr(v, name)) for name in _field_names(cls)}
    return v


def message(cls: type[Message]) -> type[Message]:
    """Register a message class under its TYPE tag."""
    if not cls.TYPE or cls.TYPE in _REGISTRY:
        raise TypeError(f"message type {cls.TYPE!r} is empty or taken")
    _REGISTRY[cls.TYPE] = cls
    return cls


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    h = _HINTS.get(cls)
    if h is None:
        h = _HINTS[cls] = typing.get_type_hints(cls)
    return h


#: per message class: (field, checker, required, "type.field") for each field, in order
_DECODERS: dict[type, list[tuple[str, Checker, bool, str]]] = {}


def _decoder(cls: type[Message]) -> list[tuple[str, Checker, bool, str]]:
    spec = _DECODERS.get(cls)
    if spec is None:
        hints = _hints(cls)
        spec = []
        for f in dataclasses.fields(cls):
            has_default = (
                f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
            )
            spec.append((f.name, _checker(hints[f.name]), not has_default, f"{cls.TYPE}.{f.name}"))
        _DECODERS[cls] = spec
    return spec


def _check(tp: Any, v: Any, name: str) -> Any:
    """`v` as a value of the declared type `tp`, or a ProtocolError naming `name`."""
    return _checker(tp)(v, name)


_CHECKERS: dict[Any, Checker] = {}


def _checker(tp: Any) -> Checker:
    """The (cached) checker of a declared field type."""
    check = _CHECKERS.get(tp)
    if check is None:
        check = _CHECKERS[tp] = _compile_checker(tp)
    return check


def _check_bool(v: Any, name: str) -> bool:
    if type(v) is not bool:
        raise ProtocolError(f"{name}: expected a boolean")
    return v


def _check_int(v: Any, name: str) -> int:
    if type(v) is not int:
        raise ProtocolError(f"{name}: expected an integer")
    return v


def _check_float(v: Any, name: str) -> float:
    if type(v) not in (int, float):
        raise ProtocolError(f"{name}: expected a number")
    return float(v)


def _check_str(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"{name}: expected a string")
    return v


def _check_bytes(v: Any, name: str) -> bytes:
    if not isinstance(v, (bytes, bytearray)):
        raise ProtocolError(f"{name}: expected bytes")
    return bytes(v)


def _check_map(v: Any, name: str) -> dict:
    if not isinstance(v, dict):
        raise ProtocolError(f"{name}: expected a map")
    return v


def _check_any(v: Any, name: str) -> Any:
    return v


_SIMPLE_CHECKERS: dict[Any, Checker] = {
    torch.Tensor: tensor_from_wire,
    bool: _check_bool,
    int: _check_int,
    float: _check_float,
    str: _check_str,
    bytes: _check_bytes,
    dict: _check_map,
    Any: _check_any,
}


def _compile_checker(tp: Any) -> Checker:
    simple = _SIMPLE_CHECKERS.get(tp)
    if simple is not None:
        return simple
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):  # only Optional[X] is supported
        inners = [a for a in args if a is not type(None)]
        if type(None) not in args or len(inners) != 1:
            return _unsupported(tp)
        inner = _checker(inners[0])

        def check_optional(v: Any, name: str) -> Any:
            return None if v is None else inner(v, name)

        return check_optional
    if origin is tuple:  # only tuple[X, ...] is supported
        if len(args) != 2 or args[1] is not Ellipsis:
            return _unsupported(tp)
        item = _checker(args[0])

        def check_tuple(v: Any, name: str) -> tuple:
            if not isinstance(v, list):
                raise ProtocolError(f"{name}: expected a list")
            return tuple([item(x, f"{name}[{i}]") for i, x in enumerate(v)])

        return check_tuple
    if origin is dict:
        return _check_map
    if dataclasses.is_dataclass(tp):  # a record nested in a message (NextHop)
        hints = _hints(tp)
        fields = [(f.name, _checker(hints[f.name])) for f in dataclasses.fields(tp)]

        def check_record(v: Any, name: str) -> Any:
            if not isinstance(v, dict):
                raise ProtocolError(f"{name}: expected a map")
            kwargs = {}
            for field, check in fields:
                if field not in v:
                    raise ProtocolError(f"{name}: missing field {field!r}")
                kwargs[field] = check(v[field], f"{name}.{field}")
            return tp(**kwargs)

        return check_record
    return _unsupported(tp)


def _unsupported(tp: Any) -> Checker:
    def check_unsupported(v: Any, name: str) -> Any:
        raise TypeError(f"unsupported field type {tp!r} in {name}")  # our bug, not the peer's

    return check_unsupported


def encode(msg: Message) -> bytes:
    """One message as one frame."""
    body = msgpack.packb(msg.to_wire(), use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Message:
    """One frame body as a message, or a ProtocolError that says what is wrong with it."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
        )
    except Exception as e:  # msgpack raises several types, all mean "garbage"
        raise ProtocolError(f"malformed msgpack body: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame body must be a map")
    tag = obj.get("t")
    cls = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {tag!r}"[:200])
    return cls.from_wire(obj)


def frame_length(header: bytes, max_frame: int) -> int:
    """The body length a 4-byte frame header announces; a fatal ProtocolError past `max_frame`
    (refused before a byte of the body is buffered: the stream can no longer be trusted)."""
    (n,) = HEADER.unpack(header)
    if n > max_frame:
        raise ProtocolError(f"frame of {n} bytes exceeds the limit of {max_frame} bytes", fatal=True)
    return n


# --- the messages of the peer protocol ------------------------------------------------------------


@message
@dataclass(frozen=True)
class Error(Message):
    """Reply to a request that failed. `code` is machine-readable, `message` is for people."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str


@message
@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"


@message
@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"


@message
@dataclass(frozen=True)
class GetInfo(Message):
    """Ask a peer for its own record and the records it knows."""

    TYPE: ClassVar[str] = "get_info"


@message
@dataclass(frozen=True)
class Info(Message):
    """A peer's own record (`peer`) and those it knows (`known`), each a signed record map."""

    TYPE: ClassVar[str] = "info"
    peer: dict
    known: tuple[dict, ...] = ()


@message
@dataclass(frozen=True)
class OpenSession(Message):
    """Open an inference session on blocks [start, end) of the peer's span.

    `max_length` bounds the tokens the session will hold (the peer reserves cache for it);
    `dtype` is the dtype the hidden states travel in, both ways.
    """

    TYPE: ClassVar[str] = "open"
    start: int
    end: int
    max_length: int
    dtype: str = "float32"


@message
@dataclass(frozen=True)
class SessionOpened(Message):
    """`push_token` lets another peer hand hidden states into this session (see Forward.next);
    only the session's owner learns it, and gives it to the hop before."""

    TYPE: ClassVar[str] = "opened"
    session: int
    push_token: bytes = b""


@dataclass(frozen=True)
class NextHop:
    """A later hop of a pushed step: the peer, its session there and that session's push token."""

    peer: str
    session: int
    token: bytes


MAX_PUSH_HOPS = 64  # hops one pushed step may name (next, carried): bounds a frame's fan-out


@message
@dataclass(frozen=True)
class Forward(Message):
    """Run `hidden` [1, n, hidden_size], the rows at positions position..position+n-1, through
    the session's blocks. A position below the session's length rewinds its cache first (a retry
    or a replay); a position above it is an error.

    A push (the hand-off of DESIGN's chain): with `next`, the peer does not answer but forwards
    its output to `next[0]`'s session, with the rest of `next`, and so on; the last peer sends
    the ForwardResult to its session's owner, the client, as do peers that fail. `token` is set
    when a peer, not the session's owner, sends the frame; it must match the session's push
    token, and a push never rewinds. `carried` collects the input of each hop so far: the
    client keeps them to replay a span after a failover."""

    TYPE: ClassVar[str] = "forward"
    session: int
    position: int
    hidden: torch.Tensor
    next: tuple[NextHop, ...] = ()
    token: bytes = b""
    carried: tuple[torch.Tensor, ...] = ()


@message
@dataclass(frozen=True)
class ForwardResult(Message):
    """The output of a step; after a push, `carried` holds the input of every hop in order."""

    TYPE: ClassVar[str] = "result"
    hidden: torch.Tensor
    carried: tuple[torch.Tensor, ...] = ()


@message
@dataclass(frozen=True)
class CloseSession(Message):
    TYPE: ClassVar[str] = "close"
    session: int


@message
@dataclass(frozen=True)
class Closed(Message):
    TYPE: ClassVar[str] = "closed"
