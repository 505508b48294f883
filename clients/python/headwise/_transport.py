"""The channel (with reconnect), staging regions and decode streams of the Python client.

Private to the package: import the names from ``headwise`` or ``headwise.client``.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from typing import Any, Iterator, Optional, Tuple, Union

import grpc
import numpy as np

from headwise._types import (DecodeOutput, HeadwiseError, Layout, Sequence, StagedOutput,
                             _check_kv, _check_layer, _check_q, _inline, _read_f32)
from headwise.v1 import policy_pb2, service_pb2, service_pb2_grpc


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
