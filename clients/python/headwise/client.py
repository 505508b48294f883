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
import os
import secrets
import threading
from typing import Any, List, Mapping, Optional, Union

import grpc
import numpy as np

from headwise._transport import (DecodeStream, StagingRegion, _Connection, _fill_staged_step,
                                 _normalize_target, _staged, _staged_output)
from headwise._types import (AttendOutput, DecodeOutput, HeadwiseError, Layout,  # noqa: F401
                             PolicySpec, Sequence, StagedOutput, _check_kv, _check_layer,
                             _check_q, _dtype_name, _inline, _policy, _read_f32, from_bf16,
                             to_bf16)
from headwise.v1 import policy_pb2, service_pb2


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
