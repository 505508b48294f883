"""The Headwise client: numpy arrays in and out over the gRPC API of ``headwised``.

It mirrors the C++ client (clients/cpp/client.h, docs/client.md): the same calls, the same status
codes (raised as :class:`HeadwiseError`), the same reconnect rule (on UNAVAILABLE the channel is
replaced; only calls that are safe to repeat are retried). Unlike the C++ client it checks tensor
shapes and dtypes against the sequence's layout before sending, and raises ``ValueError``.

Tensors (row-major numpy arrays):

* K, V: ``[T, num_kv_heads, head_dim]`` in the layout's dtype: ``np.float32`` for ``"f32"``,
  ``np.float16`` for ``"f16"``, ``np.uint16`` holding raw bfloat16 bits for ``"bf16"`` (numpy has
  no bfloat16; :func:`to_bf16` / :func:`from_bf16` convert).
* q: ``[num_q_heads, head_dim]`` (``[T, num_q_heads, head_dim]`` for prefill), any float dtype; it
  travels as float32.
* outputs: ``o`` float32 ``[num_q_heads, head_dim]`` (``[T, ...]`` for prefill) and ``lse``
  float32 ``[num_q_heads]`` (natural log of the softmax denominator).
"""

from __future__ import annotations

import itertools
import mmap
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

import grpc
import numpy as np
from google.protobuf import json_format

from headwise.v1 import policy_pb2, service_pb2, service_pb2_grpc

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


# --------------------------------------------------------------------------------------------
# Connection


def _normalize_target(target: str) -> str:
    """'unix://rel', 'unix:rel' -> 'unix:///abs/rel'; TCP targets unchanged."""
    if target.startswith("unix://"):
        rest = target[len("unix://"):]
    elif target.startswith("unix:"):
        rest = target[len("unix:"):]
    else:
        return target
    return "unix://" + os.path.normpath(os.path.abspath(rest))


class _Connection:
    """The channel and stub, replaced after UNAVAILABLE. Shared by the client and its regions."""

    def __init__(self, target: str, token: str, deadline: float, max_message_bytes: int,
                 use_tls: bool, tls_root_certs_pem: Optional[bytes], reconnect_deadline: float,
                 initial_backoff: float, max_backoff: float):
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.deadline = deadline
        self.max_message_bytes = max_message_bytes
        self.use_tls = use_tls
        self.tls_root_certs_pem = tls_root_certs_pem
        self.reconnect_deadline = reconnect_deadline
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._lock = threading.Lock()
        self._generation = 0
        self._channel: Optional[grpc.Channel] = None
        self._stub: Optional[service_pb2_grpc.HeadwiseStub] = None
        self._closed = False
        with self._lock:
            self._new_channel_locked()

    def _new_channel_locked(self) -> None:
        old = self._channel
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # A fresh subchannel per generation, so gRPC's reconnect backoff of the old one
            # does not apply (the C++ client does the same).
            ("grpc.use_local_subchannel_pool", 1),
            ("headwise.channel_generation", self._generation + 1),
        ]
        if self.use_tls:
            creds = grpc.ssl_channel_credentials(root_certificates=self.tls_root_certs_pem)
            self._channel = grpc.secure_channel(self.target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=options)
        self._stub = service_pb2_grpc.HeadwiseStub(self._channel)
        self._generation += 1
        if old is not None:
            old.close()

    def current(self) -> Tuple[service_pb2_grpc.HeadwiseStub, int]:
        with self._lock:
            if self._closed:
                raise HeadwiseError("CANCELLED", "the client is closed")
            return self._stub, self._generation

    def reset(self, seen: int) -> None:
        with self._lock:
            if not self._closed and seen == self._generation:
                self._new_channel_locked()

    def call(self, rpc: str, request: Any, idempotent: bool) -> Any:
        give_up = time.monotonic() + self.reconnect_deadline
        backoff = self.initial_backoff
        while True:
            stub, generation = self.current()
            try:
                return getattr(stub, rpc)(request, timeout=self.deadline, metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise HeadwiseError.from_rpc_error(e) from None
                self.reset(generation)
                if not idempotent or time.monotonic() + backoff > give_up:
                    raise HeadwiseError.from_rpc_error(e) from None
            time.sleep(backoff)
            backoff = min(2 * backoff, self.max_backoff)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()


# --------------------------------------------------------------------------------------------
# Staging regions


class StagingRegion:
    """A shared-memory region the daemon created (OpenStaging), mapped read-write here.

    Write inputs with :meth:`write` (or into :meth:`array` views), pass byte offsets to the
    ``*_staged`` calls, read outputs through the returned :class:`StagedOutput` views. Closing it
    (``close()``, ``with``, or garbage collection) unmaps it and calls CloseStaging, which unlinks
    the name. numpy views still alive at close keep the mapping (not the daemon's region) alive.
    """

    def __init__(self, connection: _Connection, region_id: str, shm_name: str, size: int):
        self._connection = connection
        self.id = region_id
        self.shm_name = shm_name
        self.size = int(size)
        self._mm: Optional[mmap.mmap] = None
        path = "/dev/shm/" + shm_name.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            self._close_remote_quietly()
            raise HeadwiseError("INTERNAL", f"open({path}): {e.strerror} (staging needs the "
                                            "daemon on this host)") from None
        try:
            self._mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as e:
            self._close_remote_quietly()
            raise HeadwiseError("INTERNAL", f"mmap({path}, {self.size}): {e}") from None
        finally:
            os.close(fd)
        self._open = True

    @property
    def closed(self) -> bool:
        return not getattr(self, "_open", False)

    def _check_range(self, offset: Any, nbytes: int, what: str) -> int:
        if self.closed:
            raise ValueError(f"staging region {self.id} is closed")
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise ValueError(f"{what} offset must be a non-negative int, got {offset!r}")
        if int(offset) + nbytes > self.size:
            raise ValueError(f"{what}: bytes [{offset}, {int(offset) + nbytes}) lie outside the "
                             f"region of {self.size} bytes")
        return int(offset)

    def array(self, offset: int, shape: Union[int, Tuple[int, ...]], dtype: Any = np.float32
              ) -> np.ndarray:
        """A writable numpy view of the region's bytes at `offset` (no copy)."""
        dt = np.dtype(dtype)
        shape_t = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        count = int(np.prod(shape_t)) if shape_t else 1
        offset = self._check_range(offset, count * dt.itemsize, "array")
        return np.ndarray(shape_t, dtype=dt, buffer=self._mm, offset=offset)

    def write(self, offset: int, a: Any) -> int:
        """Copies array `a` (C order) to byte `offset`; returns the offset just past it."""
        a = np.ascontiguousarray(a)
        offset = self._check_range(offset, a.nbytes, "write")
        self.array(offset, a.shape, a.dtype)[...] = a
        return offset + a.nbytes

    def _close_remote(self) -> None:
        self._connection.call(
            "CloseStaging", service_pb2.CloseStagingRequest(region_id=self.id), idempotent=False)

    def _close_remote_quietly(self) -> None:
        try:
            self._close_remote()
        except HeadwiseError:
            pass

    def close(self) -> None:
        """Unmaps (unless numpy views still use it) and closes the region on the daemon."""
        if self.closed:
            return
        self._open = False
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # Views remain: the mapping goes when they do.
            self._mm = None
        self._close_remote()

    def __enter__(self) -> "StagingRegion":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"StagingRegion(id={self.id!r}, shm_name={self.shm_name!r}, size={self.size})"


def _staged(dtype_proto: int, shape: Tuple[int, ...], region: StagingRegion, offset: int,
            nbytes: int) -> service_pb2.Tensor:
    return service_pb2.Tensor(dtype=dtype_proto, shape=list(shape), staged=service_pb2.StagedBytes(
        region_id=region.id, offset=offset, length=nbytes))


def _staged_output(region: StagingRegion, layout: Layout, o: service_pb2.Tensor,
                   lse: service_pb2.Tensor, layer_length: int) -> StagedOutput:
    if o.WhichOneof("payload") != "staged" or lse.WhichOneof("payload") != "staged":
        raise HeadwiseError("INTERNAL", "reply's o/lse are inline, expected staged")
    o_view = region.array(o.staged.offset, (layout.num_q_heads, layout.head_dim), np.float32)
    lse_view = region.array(lse.staged.offset, (layout.num_q_heads,), np.float32)
    return StagedOutput(o.staged.offset, lse.staged.offset, layer_length, o_view, lse_view)


# --------------------------------------------------------------------------------------------
# Decode stream


class DecodeStream:
    """One bidirectional stream carrying the per-layer decode steps of one sequence.

    ``step`` sends one request and waits for its answer. The first error ends the stream and
    every later step raises it. No deadline; one thread at a time.
    """

    _END = object()

    def __init__(self, connection: _Connection, seq: Sequence):
        self._seq = seq
        self._requests: "queue.Queue[Any]" = queue.Queue()
        stub, _ = connection.current()
        self._responses = stub.DecodeStream(self._request_iter(), metadata=connection.metadata)
        self._first = True
        self._error: Optional[HeadwiseError] = None
        self._finished = False

    def _request_iter(self) -> Iterator[service_pb2.StreamStepRequest]:
        while True:
            item = self._requests.get()
            if item is DecodeStream._END:
                return
            yield item

    def _round_trip(self, request: service_pb2.StreamStepRequest) -> service_pb2.DecodeStepResponse:
        if self._error is not None:
            raise self._error
        if self._finished:
            raise ValueError("the stream is finished")
        if self._first:
            request.handle = self._seq.handle
            self._first = False
        self._requests.put(request)
        try:
            return next(self._responses)
        except grpc.RpcError as e:
            self._error = HeadwiseError.from_rpc_error(e)
        except StopIteration:
            self._error = HeadwiseError("INTERNAL", "the stream ended without an answer")
        raise self._error

    def step(self, layer: int, q: Any, k: Any, v: Any) -> DecodeOutput:
        layout = self._seq.layout
        layer = _check_layer(layout, layer)
        q32 = _check_q(layout, q, None)
        k, v = _check_kv(layout, k, v, num_tokens=1, allow_2d=True)
        response = self._round_trip(service_pb2.StreamStepRequest(
            layer=layer, q=_inline(policy_pb2.DTYPE_F32, q32),
            k=_inline(layout.dtype_proto, k), v=_inline(layout.dtype_proto, v)))
        return DecodeOutput(
            _read_f32(response.o, (layout.num_q_heads, layout.head_dim), "o"),
            _read_f32(response.lse, (layout.num_q_heads,), "lse"), response.layer_length)

    def step_staged(self, layer: int, region: StagingRegion, q_offset: int, k_offset: int,
                    v_offset: int, out_offset: int) -> StagedOutput:
        layout = self._seq.layout
        request = service_pb2.StreamStepRequest(layer=_check_layer(layout, layer))
        _fill_staged_step(request, layout, region, q_offset, k_offset, v_offset, out_offset)
        response = self._round_trip(request)
        return _staged_output(region, layout, response.o, response.lse, response.layer_length)

    def finish(self) -> None:
        """Half-closes the stream; raises the stream's error, if any."""
        if not self._finished:
            self._finished = True
            self._requests.put(DecodeStream._END)
            try:
                for _ in self._responses:
                    pass
            except grpc.RpcError as e:
                if self._error is None:
                    self._error = HeadwiseError.from_rpc_error(e)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "DecodeStream":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            try:
                self.finish()
            except HeadwiseError:
                pass


def _fill_staged_step(request: Any, layout: Layout, region: StagingRegion, q_offset: int,
                      k_offset: int, v_offset: int, out_offset: int) -> None:
    qb, kb = layout.q_bytes(), layout.kv_bytes(1)
    q_offset = region._check_range(q_offset, qb, "q")
    k_offset = region._check_range(k_offset, kb, "k")
    v_offset = region._check_range(v_offset, kb, "v")
    out_offset = region._check_range(out_offset, layout.out_bytes(), "output")
    kv_shape = (1, layout.num_kv_heads, layout.head_dim)
    request.q.CopyFrom(_staged(policy_pb2.DTYPE_F32, (layout.num_q_heads, layout.head_dim),
                               region, q_offset, qb))
    request.k.CopyFrom(_staged(layout.dtype_proto, kv_shape, region, k_offset, kb))
    request.v.CopyFrom(_staged(layout.dtype_proto, kv_shape, region, v_offset, kb))
    request.output.region_id = region.id
    request.output.offset = out_offset


# --------------------------------------------------------------------------------------------
# The client


class Client:
    """A connection to ``headwised``. Thread-safe: share one across threads.

    ``target``: ``"unix:///abs/path.sock"``, ``"unix:rel/path.sock"`` (resolved against the
    working directory now), or ``"host:port"`` for TCP. ``token`` is sent as
    ``authorization: Bearer <token>``. ``deadline`` (seconds) applies to each unary call (each
    attempt of a retried one). Unless ``check_health=False`` the constructor calls Health, so a
    wrong socket (UNAVAILABLE) or token (UNAUTHENTICATED) raises here.

    Step ids. ``append``, ``prefill``, ``decode_step`` (and their staged forms) and
    ``decode_step_batch`` items take ``step_id``: ``None`` (default) lets the client pick a fresh
    one when ``step_ids`` is true, ``0`` sends none, any other int is sent as is. A call that
    carries an id is retried on UNAVAILABLE like the read-only calls: the daemon answers a
    retry of a step it already applied with the first answer instead of appending again
    (service.proto, "Step ids"). Resending an id on purpose does the same.
    """

    def __init__(self, target: str = "unix://./var/headwised.sock",
                 token: Optional[str] = None, *, deadline: float = 30.0,
                 max_message_bytes: int = 64 << 20, use_tls: bool = False,
                 tls_root_certs_pem: Optional[bytes] = None, reconnect_deadline: float = 10.0,
                 initial_backoff: float = 0.02, max_backoff: float = 1.0,
                 check_health: bool = True, step_ids: bool = True):
        if token is None:
            token = os.environ.get("HEADWISE_TOKEN", "dev-token")
        self.target = _normalize_target(target)
        self._conn = _Connection(self.target, token, deadline, max_message_bytes, use_tls,
                                 tls_root_certs_pem, reconnect_deadline, initial_backoff,
                                 max_backoff)
        self._layouts: dict = {}
        self._layouts_lock = threading.Lock()
        self._step_ids = bool(step_ids)
        # A random start, so that two clients of one tenant do not hand out the same ids.
        self._next_step_id = itertools.count(secrets.randbits(63) | 1)
        if check_health:
            try:
                self.health()
            except BaseException:
                self._conn.close()
                raise

    # -- lifetime

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- layouts and sequences

    def register_layout(self, name: str, layers: Union[int, Layout], q_heads: Optional[int] = None,
                        kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                        dtype: Any = "f16", page_tokens: int = 64) -> Layout:
        """Registers a layout under `name` (per tenant); returns it.

        ``register_layout("m", 2, 8, 2, 64, "f32")`` or ``register_layout("m", Layout(...))``.
        The same layout again is fine; a different one under the same name is ALREADY_EXISTS.
        """
        if isinstance(layers, Layout):
            layout = layers
        else:
            if q_heads is None or kv_heads is None or head_dim is None:
                raise ValueError("register_layout needs layers, q_heads, kv_heads and head_dim "
                                 "(or a headwise.Layout)")
            layout = Layout(layers, q_heads, kv_heads, head_dim, dtype, page_tokens)
        self._conn.call("RegisterLayout", service_pb2.RegisterLayoutRequest(
            name=name, layout=layout.to_proto()), idempotent=False)
        with self._layouts_lock:
            self._layouts[name] = layout
        return layout

    def create_sequence(self, layout: Union[str, Layout], policy: Union[
                        None, Mapping[str, Any], policy_pb2.PolicySpec] = None,
                        durable: bool = False, *, layout_name: Optional[str] = None) -> Sequence:
        """A new empty sequence of a registered layout.

        ``layout`` is the name given to register_layout (by this client), or a Layout together
        with ``layout_name=`` for a layout registered elsewhere. ``policy``: None (defaults), a
        dict in the protobuf JSON form of headwise.v1.PolicySpec, or a PolicySpec. ``durable``:
        acknowledged appends survive a daemon crash (the daemon needs a data dir).
        """
        if isinstance(layout, Layout):
            if layout_name is None:
                raise ValueError("create_sequence(Layout) needs layout_name=")
            name, spec = layout_name, layout
        else:
            name = layout
            with self._layouts_lock:
                spec = self._layouts.get(name)
            if spec is None:
                raise HeadwiseError("FAILED_PRECONDITION", f"layout {name!r} was not registered "
                                    "by this client: pass the Layout and layout_name=")
        response = self._conn.call("CreateSequence", service_pb2.CreateSequenceRequest(
            layout_name=name, policy=_policy(policy), durable=bool(durable)), idempotent=False)
        return Sequence(response.handle, spec)

    def fork(self, seq: Sequence) -> Sequence:
        """A copy-on-write copy of `seq` (a new handle)."""
        response = self._conn.call("Fork", service_pb2.ForkRequest(handle=_handle(seq)),
                                   idempotent=False)
        return Sequence(response.handle, seq.layout)

    def truncate(self, seq: Sequence, length: int) -> None:
        self._conn.call("Truncate", service_pb2.TruncateRequest(handle=_handle(seq),
                                                                length=int(length)),
                        idempotent=False)

    def release(self, seq: Sequence) -> None:
        """Releases the sequence; its handle is NOT_FOUND afterwards."""
        self._conn.call("Release", service_pb2.ReleaseRequest(handle=_handle(seq)),
                        idempotent=False)

    def get_sequence(self, seq: Sequence) -> service_pb2.SequenceInfo:
        return self._conn.call("GetSequence", service_pb2.GetSequenceRequest(handle=_handle(seq)),
                               idempotent=True)

    def list_sequences(self) -> List[service_pb2.SequenceInfo]:
        """Every sequence of the caller's tenant."""
        response = self._conn.call("ListSequences", service_pb2.ListSequencesRequest(),
                                   idempotent=True)
        return list(response.sequences)

    def stats(self) -> service_pb2.StatsResponse:
        return self._conn.call("Stats", service_pb2.StatsRequest(), idempotent=True)

    def health(self) -> service_pb2.HealthResponse:
        return self._conn.call("Health", service_pb2.HealthRequest(), idempotent=True)

    def _step_id(self, step_id: Optional[int]) -> int:
        if step_id is None:
            if not self._step_ids:
                return 0
            return (next(self._next_step_id) % (1 << 64)) or 1  # 0 means none.
        if isinstance(step_id, bool) or not isinstance(step_id, (int, np.integer)) \
                or not 0 <= int(step_id) < 1 << 64:
            raise ValueError(f"step_id must be an int in [0, 2**64), got {step_id!r}")
        return int(step_id)

    # -- data calls, inline

    def append(self, seq: Sequence, layer: int, k: Any, v: Any,
               step_id: Optional[int] = None) -> int:
        """Appends k, v ([T, kv_heads, head_dim], layout dtype) to `layer`; returns its length.

        Appends follow the engine's step rule: every layer appends the same number of tokens
        before any layer starts the next step (FAILED_PRECONDITION / INVALID_ARGUMENT otherwise).
        """
        layout = _layout(seq)
        layer = _check_layer(layout, layer)
        k, v = _check_kv(layout, k, v)
        sid = self._step_id(step_id)
        response = self._conn.call("Append", service_pb2.AppendRequest(
            handle=seq.handle, layer=layer, k=_inline(layout.dtype_proto, k),
            v=_inline(layout.dtype_proto, v), step_id=sid), idempotent=sid != 0)
        return response.layer_length

    def append_layers(self, seq: Sequence, k: Any, v: Any,
                      step_id: Optional[int] = None) -> int:
        """Appends one chunk of T tokens to EVERY layer in one call; returns the sequence length.

        k, v: [num_layers, T, kv_heads, head_dim] in the layout dtype (or a list of num_layers
        [T, kv_heads, head_dim] arrays). One step of the append rule on every layer, all or
        nothing: a refusal leaves every layer as it was. FAILED_PRECONDITION while a step is in
        progress (layers at different lengths).
        """
        layout = _layout(seq)
        ks, vs = list(k), list(v)
        if len(ks) != layout.num_layers or len(vs) != layout.num_layers:
            raise ValueError(f"append_layers needs {layout.num_layers} layers of k and v, got "
                             f"{len(ks)} and {len(vs)}")
        pairs = [_check_kv(layout, kl, vl) for kl, vl in zip(ks, vs)]
        tokens = pairs[0][0].shape[0]
        if any(kl.shape[0] != tokens for kl, _ in pairs):
            raise ValueError("append_layers needs the same token count on every layer")
        sid = self._step_id(step_id)
        request = service_pb2.AppendLayersRequest(handle=seq.handle, num_tokens=tokens,
                                                  step_id=sid)
        request.inline_layers.k.extend(kl.tobytes() for kl, _ in pairs)
        request.inline_layers.v.extend(vl.tobytes() for _, vl in pairs)
        return self._conn.call("AppendLayers", request, idempotent=sid != 0).length

    def attend(self, seq: Sequence, layer: int, q: Any) -> AttendOutput:
        """Decode attention of q ([q_heads, head_dim]) over the layer's cached tokens."""
        layout = _layout(seq)
        layer = _check_layer(layout, layer)
        q32 = _check_q(layout, q, None)
        response = self._conn.call("Attend", service_pb2.AttendRequest(
            handle=seq.handle, layer=layer, q=_inline(policy_pb2.DTYPE_F32, q32)),
            idempotent=True)
        return AttendOutput(_read_f32(response.o, (layout.num_q_heads, layout.head_dim), "o"),
                            _read_f32(response.lse, (layout.num_q_heads,), "lse"))

    def prefill(self, seq: Sequence, layer: int, q: Any, k: Any, v: Any,
                step_id: Optional[int] = None) -> AttendOutput:
        """Causal prefill of T tokens: q [T, q_heads, D], k, v [T, kv_heads, D] (stored).

        Token t attends every earlier cached token and tokens 0..t of this chunk. Returns
        o [T, q_heads, D] and lse [T, q_heads]. A retry whose outputs the daemon did not keep
        (over 64 KiB, or after a restart) raises ALREADY_EXISTS: the chunk was applied.
        """
        layout = _layout(seq)
        layer = _check_layer(layout, layer)
        k, v = _check_kv(layout, k, v)
        rows = k.shape[0]
        q32 = _check_q(layout, q, rows)
        sid = self._step_id(step_id)
        response = self._conn.call("Prefill", service_pb2.PrefillRequest(
            handle=seq.handle, layer=layer, q=_inline(policy_pb2.DTYPE_F32, q32),
            k=_inline(layout.dtype_proto, k), v=_inline(layout.dtype_proto, v), step_id=sid),
            idempotent=sid != 0)
        return AttendOutput(
            _read_f32(response.o, (rows, layout.num_q_heads, layout.head_dim), "o"),
            _read_f32(response.lse, (rows, layout.num_q_heads), "lse"))

    def decode_step(self, seq: Sequence, layer: int, q: Any, k: Any, v: Any,
                    step_id: Optional[int] = None) -> DecodeOutput:
        """Appends one token's k, v ([1, kv_heads, D] or [kv_heads, D]) to `layer`, then attends
        q ([q_heads, D]) over the layer including it (all-or-nothing: refused, it changes
        nothing). Returns (o, lse, layer_length)."""
        layout = _layout(seq)
        layer = _check_layer(layout, layer)
        sid = self._step_id(step_id)
        response = self._conn.call("DecodeStep", service_pb2.DecodeStepRequest(
            handle=seq.handle, layer=layer, step_id=sid,
            **_decode_tensors(layout, q, k, v)), idempotent=sid != 0)
        return _decode_output(layout, response.o, response.lse, response.layer_length)

    MAX_DECODE_BATCH_ITEMS = 256

    def decode_step_batch(self, layer: int, items: Any) -> List[Union[DecodeOutput, HeadwiseError]]:
        """One layer's decode step for many sequences of this tenant in one call.

        ``items``: (seq, q, k, v) or (seq, q, k, v, step_id) tuples, at most
        MAX_DECODE_BATCH_ITEMS, distinct sequences (else INVALID_ARGUMENT is raised and nothing
        is done). Each item is an independent decode_step; the result list holds, per item, its
        DecodeOutput or the HeadwiseError it got (e.g. NOT_FOUND for another tenant's sequence),
        and the outputs equal one decode_step per item.
        """
        request = service_pb2.DecodeStepBatchRequest(layer=int(layer))
        layouts = []
        retry = True
        for item in items:
            if len(item) not in (4, 5):
                raise ValueError("a batch item is (seq, q, k, v) or (seq, q, k, v, step_id)")
            seq, q, k, v = item[:4]
            layout = _layout(seq)
            _check_layer(layout, layer)
            sid = self._step_id(item[4] if len(item) == 5 else None)
            retry = retry and sid != 0
            request.items.append(service_pb2.DecodeStepBatchItem(
                handle=seq.handle, step_id=sid, **_decode_tensors(layout, q, k, v)))
            layouts.append(layout)
        if len(request.items) > Client.MAX_DECODE_BATCH_ITEMS:
            raise ValueError(f"a batch holds at most {Client.MAX_DECODE_BATCH_ITEMS} items")
        response = self._conn.call("DecodeStepBatch", request, idempotent=retry)
        if len(response.results) != len(layouts):
            raise HeadwiseError("INTERNAL", f"{len(response.results)} results for "
                                f"{len(layouts)} items")
        out: List[Union[DecodeOutput, HeadwiseError]] = []
        for layout, result in zip(layouts, response.results):
            if result.code != 0:
                out.append(HeadwiseError(_CODES.get(result.code, grpc.StatusCode.UNKNOWN),
                                         result.message))
            else:
                out.append(_decode_output(layout, result.o, result.lse, result.layer_length))
        return out

    def open_decode_stream(self, seq: Sequence) -> DecodeStream:
        """A DecodeStream for `seq` (no deadline)."""
        _layout(seq)
        return DecodeStream(self._conn, seq)

    # -- staging

    def open_staging(self, nbytes: int) -> StagingRegion:
        """A shared-memory region of `nbytes` bytes, mapped here (the daemon must be on this
        host). Close it (or use ``with``) to unlink it."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes <= 0:
            raise ValueError(f"open_staging needs a positive byte count, got {nbytes!r}")
        response = self._conn.call("OpenStaging", service_pb2.OpenStagingRequest(size=int(nbytes)),
                                   idempotent=False)
        return StagingRegion(self._conn, response.region_id, response.shm_name, response.size)

    def append_staged(self, seq: Sequence, layer: int, region: StagingRegion, k_offset: int,
                      v_offset: int, num_tokens: int, step_id: Optional[int] = None) -> int:
        """Append with k and v already written into `region` at k_offset and v_offset."""
        layout = _layout(seq)
        layer = _check_layer(layout, layer)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) \
                or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        nbytes = layout.kv_bytes(int(num_tokens))
        _check_region(region)
        k_offset = region._check_range(k_offset, nbytes, "k")
        v_offset = region._check_range(v_offset, nbytes, "v")
        shape = (int(num_tokens), layout.num_kv_heads, layout.head_dim)
        sid = self._step_id(step_id)
        response = self._conn.call("Append", service_pb2.AppendRequest(
            handle=seq.handle, layer=layer,
            k=_staged(layout.dtype_proto, shape, region, k_offset, nbytes),
            v=_staged(layout.dtype_proto, shape, region, v_offset, nbytes), step_id=sid),
            idempotent=sid != 0)
        return response.layer_length

    def append_layers_staged(self, seq: Sequence, region: StagingRegion, offset: int,
                             num_tokens: int, step_id: Optional[int] = None) -> int:
        """append_layers with every layer's K and V already in `region` from `offset`.

        Layer-major: K of layer 0, V of layer 0, K of layer 1, ... -- a C-contiguous
        [num_layers, 2, T, kv_heads, head_dim] array of the layout dtype, so
        ``region.array(offset, (L, 2, T, H, D), dtype)[:, 0] = k`` and ``[:, 1] = v`` fill it
        (layout.staged_layers_bytes(T) bytes). Returns the sequence length after the call.
        """
        layout = _layout(seq)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) \
                or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        _check_region(region)
        offset = region._check_range(offset, layout.staged_layers_bytes(int(num_tokens)),
                                     "layers")
        sid = self._step_id(step_id)
        request = service_pb2.AppendLayersRequest(handle=seq.handle, num_tokens=int(num_tokens),
                                                  step_id=sid)
        request.staged_layers.region_id = region.id
        request.staged_layers.offset = offset
        return self._conn.call("AppendLayers", request, idempotent=sid != 0).length

    def attend_staged(self, seq: Sequence, layer: int, region: StagingRegion, q_offset: int,
                      out_offset: int) -> StagedOutput:
        """Attend with q read from `region` at q_offset; o then lse written at out_offset."""
        layout = _layout(seq)
        layer = _check_layer(layout, layer)
        _check_region(region)
        qb = layout.q_bytes()
        q_offset = region._check_range(q_offset, qb, "q")
        out_offset = region._check_range(out_offset, layout.out_bytes(), "output")
        # Not retried: after a daemon restart the region id is gone anyway.
        response = self._conn.call("Attend", service_pb2.AttendRequest(
            handle=seq.handle, layer=layer,
            q=_staged(policy_pb2.DTYPE_F32, (layout.num_q_heads, layout.head_dim), region,
                      q_offset, qb),
            output=service_pb2.OutputPlacement(region_id=region.id, offset=out_offset)),
            idempotent=False)
        return _staged_output(region, layout, response.o, response.lse, 0)

    def decode_step_staged(self, seq: Sequence, layer: int, region: StagingRegion,
                           q_offset: int, k_offset: int, v_offset: int,
                           out_offset: int, step_id: Optional[int] = None) -> StagedOutput:
        """decode_step with q, k, v read from `region`; o then lse written at out_offset."""
        layout = _layout(seq)
        _check_region(region)
        sid = self._step_id(step_id)
        request = service_pb2.DecodeStepRequest(handle=seq.handle,
                                                layer=_check_layer(layout, layer), step_id=sid)
        _fill_staged_step(request, layout, region, q_offset, k_offset, v_offset, out_offset)
        response = self._conn.call("DecodeStep", request, idempotent=sid != 0)
        return _staged_output(region, layout, response.o, response.lse, response.layer_length)


# gRPC status codes by number (a batch result carries its code as an int).
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _decode_tensors(layout: Layout, q: Any, k: Any, v: Any) -> dict:
    """The q, k, v tensors of one decode step, checked against the layout."""
    q32 = _check_q(layout, q, None)
    k, v = _check_kv(layout, k, v, num_tokens=1, allow_2d=True)
    return dict(q=_inline(policy_pb2.DTYPE_F32, q32), k=_inline(layout.dtype_proto, k),
                v=_inline(layout.dtype_proto, v))


def _decode_output(layout: Layout, o: Any, lse: Any, layer_length: int) -> DecodeOutput:
    return DecodeOutput(_read_f32(o, (layout.num_q_heads, layout.head_dim), "o"),
                        _read_f32(lse, (layout.num_q_heads,), "lse"), layer_length)


def _handle(seq: Any) -> str:
    if isinstance(seq, Sequence):
        return seq.handle
    raise ValueError(f"expected a headwise.Sequence, got {type(seq).__name__} (wrap a raw handle "
                     "with Sequence(handle, layout))")


def _layout(seq: Any) -> Layout:
    _handle(seq)
    return seq.layout


def _check_region(region: Any) -> None:
    if not isinstance(region, StagingRegion):
        raise ValueError(f"expected a headwise.StagingRegion, got {type(region).__name__}")
    if region.closed:
        raise ValueError(f"staging region {region.id} is closed")
