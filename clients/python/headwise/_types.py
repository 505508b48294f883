"""Errors, dtypes, layouts, sequences and request validation of the Python client.

Private to the package: import the names from ``headwise`` or ``headwise.client``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Tuple, Union

import grpc
import numpy as np
from google.protobuf import json_format

from headwise.v1 import policy_pb2, service_pb2

PolicySpec = policy_pb2.PolicySpec

# --------------------------------------------------------------------------------------------
# Errors


class HeadwiseError(Exception):
    """A call failed with a gRPC status (the daemon's, or the channel's).

    ``code`` is the status code's name ("NOT_FOUND", "INVALID_ARGUMENT", "UNAUTHENTICATED",
    "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ALREADY_EXISTS", "UNAVAILABLE", ...),
    ``status`` the ``grpc.StatusCode`` and ``details`` the daemon's message.
    """

    def __init__(self, code: Union[str, grpc.StatusCode], details: str = ""):
        if isinstance(code, grpc.StatusCode):
            status = code
        else:
            status = grpc.StatusCode[code]
        self.status: grpc.StatusCode = status
        self.code: str = status.name
        self.details: str = details
        super().__init__(f"{self.code}: {details}" if details else self.code)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "HeadwiseError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


# --------------------------------------------------------------------------------------------
# dtypes and layouts

_DTYPES = {
    "f32": (policy_pb2.DTYPE_F32, np.dtype("<f4")),
    "f16": (policy_pb2.DTYPE_F16, np.dtype("<f2")),
    "bf16": (policy_pb2.DTYPE_BF16, np.dtype("<u2")),
}
_DTYPE_ALIASES = {
    "f32": "f32", "float32": "f32", "fp32": "f32",
    "f16": "f16", "float16": "f16", "fp16": "f16", "half": "f16",
    "bf16": "bf16", "bfloat16": "bf16",
}
_PROTO_TO_NAME = {policy_pb2.DTYPE_F32: "f32", policy_pb2.DTYPE_F16: "f16",
                  policy_pb2.DTYPE_BF16: "bf16", policy_pb2.DTYPE_UNSPECIFIED: "f16"}


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.lower())
        if name is None:
            raise ValueError(f"unknown dtype {dtype!r}: use 'f32', 'f16' or 'bf16'")
        return name
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}: use 'f32', 'f16' or 'bf16'") from None
    if np_dtype == np.float32:
        return "f32"
    if np_dtype == np.float16:
        return "f16"
    raise ValueError(f"unknown dtype {dtype!r}: use 'f32', 'f16' or 'bf16'")


def to_bf16(x: Any) -> np.ndarray:
    """Float array -> np.uint16 array of bfloat16 bits (round to nearest even, NaN kept NaN)."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    bits = f.view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    nan = np.isnan(f)
    out = rounded.astype(np.uint16)
    out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def from_bf16(bits: Any) -> np.ndarray:
    """np.uint16 array of bfloat16 bits -> float32 array (exact)."""
    b = np.ascontiguousarray(bits, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class Layout:
    """The shape of one model's KV cache (headwise.v1.ModelLayoutProto)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "f16"  # "f32", "f16" or "bf16" (raw bits in np.uint16 arrays)
    page_tokens: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        for field in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "page_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"Layout.{field} must be an int, got {value!r}")
            object.__setattr__(self, field, int(value))

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_q_heads // self.num_kv_heads if self.num_kv_heads else 0

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype K and V must have (np.uint16 = raw bfloat16 bits for "bf16")."""
        return _DTYPES[self.dtype][1]

    @property
    def dtype_proto(self) -> int:
        return _DTYPES[self.dtype][0]

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of one K (or V) tensor of num_tokens tokens."""
        return num_tokens * self.num_kv_heads * self.head_dim * self.np_dtype.itemsize

    def staged_layers_bytes(self, num_tokens: int) -> int:
        """Bytes of a staged append_layers payload: K and V of every layer, num_tokens each."""
        return 2 * self.num_layers * self.kv_bytes(num_tokens)

    def q_bytes(self, num_tokens: int = 1) -> int:
        return num_tokens * self.num_q_heads * self.head_dim * 4

    def out_bytes(self, num_tokens: int = 1) -> int:
        """Bytes of o then lse for num_tokens query rows (what a staged output occupies)."""
        return num_tokens * self.num_q_heads * (self.head_dim + 1) * 4

    def to_proto(self) -> policy_pb2.ModelLayoutProto:
        return policy_pb2.ModelLayoutProto(
            num_layers=self.num_layers, num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            dtype=self.dtype_proto, page_tokens=self.page_tokens)

    @classmethod
    def from_proto(cls, proto: policy_pb2.ModelLayoutProto) -> "Layout":
        return cls(proto.num_layers, proto.num_q_heads, proto.num_kv_heads, proto.head_dim,
                   _PROTO_TO_NAME[proto.dtype],
                   proto.page_tokens if proto.HasField("page_tokens") else 64)


class Sequence:
    """A sequence handle (32 hex digits) plus the layout it was created with.

    A small value: copying it does not copy the sequence (use Client.fork). A handle obtained
    elsewhere is wrapped with ``Sequence(handle, layout)``.
    """

    __slots__ = ("handle", "layout")

    def __init__(self, handle: str, layout: Layout):
        if not isinstance(layout, Layout):
            raise ValueError(f"Sequence needs a headwise.Layout, got {type(layout).__name__}")
        self.handle = str(handle)
        self.layout = layout

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and other.handle == self.handle

    def __hash__(self) -> int:
        return hash(self.handle)

    def __repr__(self) -> str:
        return f"Sequence({self.handle!r}, {self.layout!r})"


class AttendOutput(NamedTuple):
    """o: float32 [num_q_heads, head_dim] ([T, ...] for prefill); lse: float32 [num_q_heads]."""

    o: np.ndarray
    lse: np.ndarray


class DecodeOutput(NamedTuple):
    o: np.ndarray
    lse: np.ndarray
    layer_length: int  # tokens held by the layer after the step's append


class StagedOutput(NamedTuple):
    """Outputs the daemon wrote into a staging region: byte offsets, and numpy views there."""

    o_offset: int
    lse_offset: int
    layer_length: int  # decode steps only (0 for attend)
    o: np.ndarray  # view into the region; valid until the region is closed
    lse: np.ndarray


# --------------------------------------------------------------------------------------------
# Validation and tensor encoding


def _check_layer(layout: Layout, layer: Any) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer must be an int, got {layer!r}")
    if not 0 <= layer < layout.num_layers:
        raise ValueError(f"layer {layer} out of range: the layout has {layout.num_layers} layers")
    return int(layer)


def _as_array(x: Any, what: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise ValueError(f"{what} must be a numpy array, got {type(x).__name__}")


def _check_kv(layout: Layout, k: Any, v: Any, num_tokens: Optional[int] = None,
              allow_2d: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    want_dtype = layout.np_dtype
    out = []
    for name, x in (("k", k), ("v", v)):
        a = _as_array(x, name)
        if allow_2d and a.ndim == 2:
            a = a.reshape((1,) + a.shape)
        tail = (layout.num_kv_heads, layout.head_dim)
        if a.ndim != 3 or tuple(a.shape[1:]) != tail or a.shape[0] < 1:
            raise ValueError(
                f"{name} has shape {tuple(a.shape)}, expected [T, num_kv_heads={tail[0]}, "
                f"head_dim={tail[1]}] with T >= 1")
        if num_tokens is not None and a.shape[0] != num_tokens:
            raise ValueError(f"{name} has {a.shape[0]} tokens, expected {num_tokens}")
        if a.dtype != want_dtype:
            hint = {"f32": "k.astype(np.float32)", "f16": "k.astype(np.float16)",
                    "bf16": "headwise.to_bf16(k) (np.uint16 arrays hold raw bfloat16 bits)"}
            raise ValueError(
                f"{name} has dtype {a.dtype}, but the layout stores {layout.dtype}: pass "
                f"{np.dtype(want_dtype).name} ({hint[layout.dtype]})")
        out.append(np.ascontiguousarray(a, dtype=want_dtype))
    if out[0].shape != out[1].shape:
        raise ValueError(f"k and v differ in shape: {out[0].shape} vs {out[1].shape}")
    return out[0], out[1]


def _check_q(layout: Layout, q: Any, rows: Optional[int]) -> np.ndarray:
    a = _as_array(q, "q")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"q must be a float array, got dtype {a.dtype}")
    tail = (layout.num_q_heads, layout.head_dim)
    if rows is None:  # decode: [num_q_heads, head_dim] (a leading 1 is accepted)
        if a.ndim == 3 and a.shape[0] == 1:
            a = a.reshape(tail if tuple(a.shape[1:]) == tail else a.shape)
        if tuple(a.shape) != tail:
            raise ValueError(f"q has shape {tuple(a.shape)}, expected [num_q_heads={tail[0]}, "
                             f"head_dim={tail[1]}]")
    else:
        if a.ndim != 3 or tuple(a.shape) != (rows,) + tail:
            raise ValueError(f"q has shape {tuple(a.shape)}, expected [T={rows}, "
                             f"num_q_heads={tail[0]}, head_dim={tail[1]}]")
    return np.ascontiguousarray(a, dtype="<f4")


def _inline(dtype_proto: int, a: np.ndarray) -> service_pb2.Tensor:
    return service_pb2.Tensor(dtype=dtype_proto, shape=list(a.shape), data=a.tobytes())


def _read_f32(tensor: service_pb2.Tensor, shape: Tuple[int, ...], what: str) -> np.ndarray:
    if tensor.WhichOneof("payload") != "data":
        raise HeadwiseError("INTERNAL", f"reply's {what} is not inline")
    count = int(np.prod(shape)) if shape else 1
    if len(tensor.data) != 4 * count:
        raise HeadwiseError("INTERNAL", f"reply's {what} has {len(tensor.data)} bytes, "
                                        f"expected {4 * count}")
    return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32)


def _policy(policy: Union[None, Mapping[str, Any], policy_pb2.PolicySpec]) -> policy_pb2.PolicySpec:
    if policy is None:
        return policy_pb2.PolicySpec()
    if isinstance(policy, policy_pb2.PolicySpec):
        return policy
    if isinstance(policy, Mapping):
        try:
            return json_format.ParseDict(dict(policy), policy_pb2.PolicySpec())
        except json_format.ParseError as e:
            raise ValueError(f"policy: {e}") from None
    raise ValueError(f"policy must be None, a dict or a headwise.PolicySpec, got "
                     f"{type(policy).__name__}")
