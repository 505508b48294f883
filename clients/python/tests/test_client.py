"""The Python client against the real headwised (conftest.py starts it), checked with numpy."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import headwise
from headwise import HeadwiseError, Layout, Sequence

REPO = Path(__file__).resolve().parents[3]
TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# numpy reference (float64)


def ref_attention(q, k, v, causal_offset=None):
    """q [Hq, D] (or [T, Hq, D] with causal_offset = tokens cached before the chunk);
    k, v [N, Hkv, D] -> o, lse in float64. Query head h reads KV head h // (Hq / Hkv)."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    if causal_offset is None:
        o, lse = ref_attention(q[None], k, v, causal_offset=k.shape[0] - 1)
        return o[0], lse[0]
    rows, hq, d = q.shape
    group = hq // k.shape[1]
    kh = k[:, np.arange(hq) // group, :]  # [N, Hq, D]
    vh = v[:, np.arange(hq) // group, :]
    scores = np.einsum("rhd,nhd->rhn", q, kh) / np.sqrt(d)  # [T, Hq, N]
    visible = np.arange(k.shape[0])[None, :] <= (causal_offset + np.arange(rows))[:, None]
    scores = np.where(visible[:, None, :], scores, -np.inf)
    m = scores.max(axis=2, keepdims=True)
    p = np.exp(scores - m)
    denom = p.sum(axis=2, keepdims=True)
    o = np.einsum("rhn,nhd->rhd", p / denom, vh)
    return o, (m + np.log(denom))[..., 0]


def rel_diff(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a - b) / (1.0 + np.abs(b))
    assert not np.isnan(d).any(), "NaN in the output"
    return float(d.max())


def assert_close(out, ref_o, ref_lse):
    assert out.o.dtype == np.float32 and out.lse.dtype == np.float32
    assert rel_diff(out.o, ref_o) <= TOL
    assert rel_diff(out.lse, ref_lse) <= TOL


def random_kv(rng, layout, tokens):
    """Random K/V in the layout's storage dtype and the exact values they hold (float64)."""
    shape = (tokens, layout.num_kv_heads, layout.head_dim)
    pair = []
    for _ in range(2):
        x = rng.standard_normal(shape).astype(np.float32) + 0.1  # never all zeros
        if layout.dtype == "f32":
            stored, exact = x, x.astype(np.float64)
        elif layout.dtype == "f16":
            stored = x.astype(np.float16)
            exact = stored.astype(np.float64)
        else:
            stored = headwise.to_bf16(x)
            exact = headwise.from_bf16(stored).astype(np.float64)
        pair.append((stored, exact))
    return pair


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:8]}"


# GQA group 4: 8 query heads over 2 KV heads. Pages of 8 KiB (page_tokens x head_dim x dtype size
# x 2 for K and V): 16 tokens in f32 and 32 in f16/bf16, so the appends cross pages.
PAGE_BYTES = 8192


def make_layout(client, dtype, layers=2):
    name = unique(f"gqa4-{dtype}")
    page_tokens = PAGE_BYTES // (64 * (4 if dtype == "f32" else 2) * 2)
    layout = client.register_layout(name, layers, 8, 2, 64, dtype=dtype, page_tokens=page_tokens)
    assert layout.group == 4
    return name, layout


# ---------------------------------------------------------------------------------------------
# attention equality


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_attend_matches_numpy(client, dtype):
    rng = np.random.default_rng(7)
    name, layout = make_layout(client, dtype)
    seq = client.create_sequence(name)
    exact_k = [[] for _ in range(layout.num_layers)]
    exact_v = [[] for _ in range(layout.num_layers)]
    total = 0
    for step_tokens in (1, 37, 16, 90):  # several steps, partial and whole pages
        total += step_tokens
        for layer in range(layout.num_layers):
            (k, ek), (v, ev) = random_kv(rng, layout, step_tokens)
            assert client.append(seq, layer, k, v) == total
            exact_k[layer].append(ek)
            exact_v[layer].append(ev)
        for layer in range(layout.num_layers):
            q = rng.standard_normal((8, 64)).astype(np.float32)
            out = client.attend(seq, layer, q)
            assert out.o.shape == (8, 64) and out.lse.shape == (8,)
            ref_o, ref_lse = ref_attention(q, np.concatenate(exact_k[layer]),
                                           np.concatenate(exact_v[layer]))
            assert_close(out, ref_o, ref_lse)
    info = client.get_sequence(seq)
    assert list(info.layer_lengths) == [total] * layout.num_layers
    client.release(seq)


def test_decode_step_matches_numpy(client):
    rng = np.random.default_rng(11)
    name, layout = make_layout(client, "f16")
    seq = client.create_sequence(name)
    ks, vs = [], []
    for layer in range(layout.num_layers):
        (k, ek), (v, ev) = random_kv(rng, layout, 20)
        client.append(seq, layer, k, v)
        ks.append([ek])
        vs.append([ev])
    for step in range(5):
        for layer in range(layout.num_layers):
            (k, ek), (v, ev) = random_kv(rng, layout, 1)
            q = rng.standard_normal((8, 64))  # float64 q is sent as float32
            # [1, kv, D] and [kv, D] are both accepted for the one token.
            kk, vv = (k, v) if step % 2 == 0 else (k[0], v[0])
            out = client.decode_step(seq, layer, q, kk, vv)
            assert out.layer_length == 21 + step
            ks[layer].append(ek)
            vs[layer].append(ev)
            ref_o, ref_lse = ref_attention(q.astype(np.float32), np.concatenate(ks[layer]),
                                           np.concatenate(vs[layer]))
            assert_close(out, ref_o, ref_lse)
    client.release(seq)


def test_prefill_matches_numpy(client):
    rng = np.random.default_rng(13)
    name, layout = make_layout(client, "f32")
    seq = client.create_sequence(name)
    ks = [[] for _ in range(layout.num_layers)]
    vs = [[] for _ in range(layout.num_layers)]
    cached = 0
    for chunk in (24, 41):  # the second chunk also attends the first (causal, with context)
        for layer in range(layout.num_layers):
            (k, ek), (v, ev) = random_kv(rng, layout, chunk)
            q = rng.standard_normal((chunk, 8, 64)).astype(np.float32)
            out = client.prefill(seq, layer, q, k, v)
            assert out.o.shape == (chunk, 8, 64) and out.lse.shape == (chunk, 8)
            ks[layer].append(ek)
            vs[layer].append(ev)
            ref_o, ref_lse = ref_attention(q, np.concatenate(ks[layer]),
                                           np.concatenate(vs[layer]), causal_offset=cached)
            assert_close(out, ref_o, ref_lse)
        cached += chunk
    assert list(client.get_sequence(seq).layer_lengths) == [cached] * layout.num_layers
    client.release(seq)


def test_decode_stream_matches_numpy(client):
    rng = np.random.default_rng(17)
    name, layout = make_layout(client, "f32")
    seq = client.create_sequence(name)
    ks = [[] for _ in range(layout.num_layers)]
    vs = [[] for _ in range(layout.num_layers)]
    with client.open_decode_stream(seq) as stream:
        for step in range(3):
            for layer in range(layout.num_layers):
                (k, ek), (v, ev) = random_kv(rng, layout, 1)
                q = rng.standard_normal((8, 64)).astype(np.float32)
                out = stream.step(layer, q, k, v)
                assert out.layer_length == step + 1
                ks[layer].append(ek)
                vs[layer].append(ev)
                assert_close(out, *ref_attention(q, np.concatenate(ks[layer]),
                                                 np.concatenate(vs[layer])))
    client.release(seq)


def test_decode_stream_error_ends_stream(client):
    name, layout = make_layout(client, "f32")
    forged = Sequence("0123456789abcdef0123456789abcdef", layout)
    stream = client.open_decode_stream(forged)
    k = np.ones((1, 2, 64), np.float32)
    with pytest.raises(HeadwiseError) as e:
        stream.step(0, np.ones((8, 64), np.float32), k, k)
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(HeadwiseError):  # the same error again
        stream.step(0, np.ones((8, 64), np.float32), k, k)
    with pytest.raises(HeadwiseError):
        stream.finish()


# ---------------------------------------------------------------------------------------------
# staging


def test_staged_append_attend_and_decode_step(client):
    rng = np.random.default_rng(19)
    name, layout = make_layout(client, "f16", layers=1)
    seq = client.create_sequence(name)
    tokens = 50
    (k, ek), (v, ev) = random_kv(rng, layout, tokens)
    with client.open_staging(1 << 20) as region:
        assert region.size >= 1 << 20
        shm_path = "/dev/shm/" + region.shm_name.lstrip("/")
        assert os.path.exists(shm_path)
        k_off = 0
        v_off = region.write(k_off, k)
        end = region.write(v_off, v)
        assert client.append_staged(seq, 0, region, k_off, v_off, tokens) == tokens

        q = rng.standard_normal((8, 64)).astype(np.float32)
        q_off = 64 * 1024
        region.array(q_off, (8, 64), np.float32)[...] = q  # a view, written in place
        out_off = 128 * 1024
        staged = client.attend_staged(seq, 0, region, q_off, out_off)
        assert staged.o_offset == out_off
        assert staged.lse_offset == out_off + layout.num_q_heads * layout.head_dim * 4
        ref_o, ref_lse = ref_attention(q, ek, ev)
        assert rel_diff(staged.o, ref_o) <= TOL and rel_diff(staged.lse, ref_lse) <= TOL
        inline = client.attend(seq, 0, q)
        np.testing.assert_array_equal(inline.o, staged.o)

        (k1, ek1), (v1, ev1) = random_kv(rng, layout, 1)
        k1_off = region.write(end, k1)
        v1_off = k1_off
        v1_end = region.write(v1_off, v1)
        k1_off = end
        q1 = rng.standard_normal((8, 64)).astype(np.float32)
        q1_off = region.write(v1_end + 16 - v1_end % 16, q1) - q1.nbytes
        step = client.decode_step_staged(seq, 0, region, q1_off, k1_off, v1_off, 256 * 1024)
        assert step.layer_length == tokens + 1
        ref_o, ref_lse = ref_attention(q1, np.concatenate([ek, ek1]), np.concatenate([ev, ev1]))
        assert rel_diff(step.o, ref_o) <= TOL and rel_diff(step.lse, ref_lse) <= TOL

        # Client-side range checks.
        with pytest.raises(ValueError, match="outside the region"):
            client.attend_staged(seq, 0, region, region.size - 8, 0)
        with pytest.raises(ValueError, match="outside the region"):
            client.append_staged(seq, 0, region, 0, region.size, 1)
        del staged, step  # views into the mapping
    assert region.closed
    assert not os.path.exists(shm_path)
    with pytest.raises(ValueError, match="closed"):
        client.attend_staged(seq, 0, region, 0, 0)
    client.release(seq)


# ---------------------------------------------------------------------------------------------
# sequences, policies, stats


def test_fork_truncate_list_stats_health(client):
    rng = np.random.default_rng(23)
    name, layout = make_layout(client, "f32", layers=1)
    seq = client.create_sequence(name, policy={"eviction": {"none": {}}})
    (k, ek), (v, ev) = random_kv(rng, layout, 40)
    client.append(seq, 0, k, v)
    child = client.fork(seq)
    assert child != seq and child.layout == layout
    client.truncate(child, 10)
    assert list(client.get_sequence(child).layer_lengths) == [10]
    assert list(client.get_sequence(seq).layer_lengths) == [40]
    q = rng.standard_normal((8, 64)).astype(np.float32)
    assert_close(client.attend(child, 0, q), *ref_attention(q, ek[:10], ev[:10]))
    assert_close(client.attend(seq, 0, q), *ref_attention(q, ek, ev))
    handles = {info.handle for info in client.list_sequences()}
    assert {seq.handle, child.handle} <= handles
    stats = client.stats()
    assert stats.sequences >= 2 and stats.tenant_sequences >= 2
    assert {t.tier for t in stats.tiers} >= {"device", "host"}
    assert client.health().status == "SERVING"
    client.release(child)
    client.release(seq)
    with pytest.raises(HeadwiseError) as e:
        client.get_sequence(seq)
    assert e.value.code == "NOT_FOUND"


def test_policy_forms(client):
    name, _ = make_layout(client, "f16", layers=1)
    spec = headwise.PolicySpec()
    spec.eviction.streaming_llm.sink_tokens = 16
    spec.eviction.streaming_llm.recent_tokens = 64
    client.release(client.create_sequence(name, policy=spec))
    client.release(client.create_sequence(
        name, policy={"eviction": {"streamingLlm": {"sinkTokens": 16, "recentTokens": 64}}}))
    with pytest.raises(ValueError, match="policy"):
        client.create_sequence(name, policy={"no_such_field": 1})


# ---------------------------------------------------------------------------------------------
# errors


def test_client_side_validation(client):
    name, layout = make_layout(client, "f16")
    seq = client.create_sequence(name)
    good = np.ones((3, 2, 64), np.float16)
    with pytest.raises(ValueError, match=r"expected \[T, num_kv_heads=2, head_dim=64\]"):
        client.append(seq, 0, np.ones((3, 4, 64), np.float16), good)
    with pytest.raises(ValueError, match="dtype float32, but the layout stores f16"):
        client.append(seq, 0, good.astype(np.float32), good.astype(np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        client.append(seq, 0, good, good[:2])
    with pytest.raises(ValueError, match="layer 2 out of range"):
        client.append(seq, 2, good, good)
    with pytest.raises(ValueError, match="q has shape"):
        client.attend(seq, 0, np.ones((2, 64), np.float32))
    with pytest.raises(ValueError, match="float array"):
        client.attend(seq, 0, np.ones((8, 64), np.int32))
    with pytest.raises(ValueError, match="tokens, expected 1"):
        client.decode_step(seq, 0, np.ones((8, 64), np.float32), good, good)
    with pytest.raises(ValueError, match=r"T=3"):
        client.prefill(seq, 0, np.ones((2, 8, 64), np.float32), good, good)
    with pytest.raises(ValueError, match="unknown dtype"):
        client.register_layout(unique("bad"), 1, 8, 2, 64, dtype="int8")
    # Nothing reached the daemon.
    assert list(client.get_sequence(seq).layer_lengths) == [0, 0]
    client.release(seq)


def test_server_error_codes(client, daemon):
    name, layout = make_layout(client, "f32")
    forged = Sequence("0123456789abcdef0123456789abcdef", layout)
    k = np.ones((1, 2, 64), np.float32)
    with pytest.raises(HeadwiseError) as e:
        client.append(forged, 0, k, k)
    assert e.value.code == "NOT_FOUND" and e.value.status.name == "NOT_FOUND"
    with pytest.raises(HeadwiseError) as e:
        client.attend(Sequence("not-a-handle", layout), 0, np.ones((8, 64), np.float32))
    assert e.value.code == "NOT_FOUND"
    # The same name with another layout.
    with pytest.raises(HeadwiseError) as e:
        client.register_layout(name, 2, 8, 2, 128, dtype="f32", page_tokens=16)
    assert e.value.code == "ALREADY_EXISTS"
    # Shapes the client cannot know are wrong: a layout the daemon has with another head_dim.
    seq = client.create_sequence(name)
    lying = Sequence(seq.handle, Layout(2, 8, 2, 32, "f32", 16))
    with pytest.raises(HeadwiseError) as e:
        client.append(lying, 0, np.ones((1, 2, 32), np.float32), np.ones((1, 2, 32), np.float32))
    assert e.value.code == "INVALID_ARGUMENT"
    # A layout name this client did not register: client-side FAILED_PRECONDITION, like C++.
    with pytest.raises(HeadwiseError) as e:
        client.create_sequence(unique("unknown"))
    assert e.value.code == "FAILED_PRECONDITION"
    with pytest.raises(HeadwiseError) as e:
        client.create_sequence(layout, layout_name=unique("unknown"))
    assert e.value.code == "NOT_FOUND"
    client.release(seq)


def test_wrong_token_is_unauthenticated(daemon):
    with pytest.raises(HeadwiseError) as e:
        daemon.client(token="wrong-token")
    assert e.value.code == "UNAUTHENTICATED"
    c = daemon.client(token="wrong-token", check_health=False)
    with pytest.raises(HeadwiseError) as e:
        c.stats()
    assert e.value.code == "UNAUTHENTICATED"
    c.close()


def test_no_daemon_is_unavailable(tmp_path):
    with pytest.raises(HeadwiseError) as e:
        headwise.Client(f"unix://{tmp_path}/none.sock", token="x", reconnect_deadline=0.1,
                        deadline=2.0)
    assert e.value.code == "UNAVAILABLE"


# ---------------------------------------------------------------------------------------------
# the example


def test_numpy_attention_example(daemon):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "clients" / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    result = subprocess.run(
        [sys.executable, str(REPO / "clients" / "python" / "examples" / "numpy_attention.py"),
         "--target", daemon.target, "--token", daemon.token],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max relative difference vs numpy" in result.stdout
    assert result.stdout.rstrip().endswith("OK")


def test_step_ids_make_retries_append_once(client):
    rng = np.random.default_rng(21)
    name, layout = make_layout(client, "f32")
    seq = client.create_sequence(name)
    for layer in range(layout.num_layers):
        (k, _), (v, _) = random_kv(rng, layout, 4)
        assert client.append(seq, layer, k, v, step_id=1000 + layer) == 4
        # The same id again: a retry, answered with the first length, nothing appended.
        assert client.append(seq, layer, k, v, step_id=1000 + layer) == 4
    (k, _), (v, _) = random_kv(rng, layout, 1)
    q = rng.standard_normal((8, 64)).astype(np.float32)
    first = client.decode_step(seq, 0, q, k, v, step_id=7)
    again = client.decode_step(seq, 0, q, k, v, step_id=7)
    assert first.layer_length == again.layer_length == 5
    np.testing.assert_array_equal(first.o, again.o)
    np.testing.assert_array_equal(first.lse, again.lse)
    # The id reused by another kind of call on that layer is refused.
    with pytest.raises(headwise.HeadwiseError) as e:
        client.append(seq, 0, k, v, step_id=7)
    assert e.value.code == "INVALID_ARGUMENT"
    assert list(client.get_sequence(seq).layer_lengths) == [5, 4]
    with pytest.raises(ValueError):
        client.decode_step(seq, 1, q, k, v, step_id=-1)
    client.release(seq)


def test_decode_step_batch_equals_one_call_per_sequence(client):
    rng = np.random.default_rng(22)
    name, layout = make_layout(client, "f16")
    seqs, twins = [], []
    for i in range(3):
        a, b = client.create_sequence(name), client.create_sequence(name)
        for layer in range(layout.num_layers):
            (k, _), (v, _) = random_kv(rng, layout, 3 + 5 * i)
            client.append(a, layer, k, v)
            client.append(b, layer, k, v)
        seqs.append(a)
        twins.append(b)
    # A sequence of another tenant's namespace: an unknown handle is NOT_FOUND for its item.
    stranger = headwise.Sequence("0123456789abcdef0123456789abcdef", layout)
    items, want = [], []
    for a, b in zip(seqs, twins):
        (k, _), (v, _) = random_kv(rng, layout, 1)
        q = rng.standard_normal((8, 64)).astype(np.float32)
        want.append(client.decode_step(b, 0, q, k, v))
        items.append((a, q, k, v))
    items.append((stranger, q, k, v))
    results = client.decode_step_batch(0, items)
    assert len(results) == 4
    for got, expected in zip(results[:3], want):
        assert isinstance(got, headwise.DecodeOutput), got
        assert got.layer_length == expected.layer_length
        np.testing.assert_array_equal(got.o, expected.o)
        np.testing.assert_array_equal(got.lse, expected.lse)
    assert isinstance(results[3], headwise.HeadwiseError)
    assert results[3].code == "NOT_FOUND"
    with pytest.raises(headwise.HeadwiseError) as e:
        client.decode_step_batch(1, [items[0], items[0]])
    assert e.value.code == "INVALID_ARGUMENT"
    for s in seqs + twins:
        client.release(s)
