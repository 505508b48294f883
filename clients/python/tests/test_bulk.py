"""append_layers / append_layers_staged (AppendLayers) against a real headwised: every layer of a
chunk in one call lands where per-layer appends would (float64 numpy reference), a refusal changes
nothing, and a durable sequence takes it too."""
import numpy as np
import pytest

import headwise
from test_client import TOL, make_layout, random_kv, ref_attention, rel_diff


def random_layers(rng, layout, tokens):
    """k, v [L, T, H, D] in the storage dtype and their exact float64 values."""
    per_layer = [random_kv(rng, layout, tokens) for _ in range(layout.num_layers)]
    k = np.stack([p[0][0] for p in per_layer])
    v = np.stack([p[1][0] for p in per_layer])
    ek = np.stack([p[0][1] for p in per_layer])
    ev = np.stack([p[1][1] for p in per_layer])
    return k, v, ek, ev


def check_every_layer(client, seq, layout, rng, ek, ev):
    for layer in range(layout.num_layers):
        q = rng.standard_normal((layout.num_q_heads, layout.head_dim)).astype(np.float32)
        out = client.attend(seq, layer, q)
        ref_o, ref_lse = ref_attention(q, ek[layer], ev[layer])
        assert rel_diff(out.o, ref_o) <= TOL and rel_diff(out.lse, ref_lse) <= TOL


@pytest.mark.parametrize("durable", [False, True])
def test_append_layers_inline_then_staged_matches_numpy(client, durable):
    rng = np.random.default_rng(71)
    name, layout = make_layout(client, "f16", layers=3)
    seq = client.create_sequence(name, durable=durable)
    k1, v1, ek1, ev1 = random_layers(rng, layout, 20)
    assert client.append_layers(seq, k1, v1) == 20
    k2, v2, ek2, ev2 = random_layers(rng, layout, 13)
    nbytes = layout.staged_layers_bytes(13)
    with client.open_staging(nbytes + 4096) as region:
        view = region.array(4096, (layout.num_layers, 2, 13, layout.num_kv_heads,
                                   layout.head_dim), np.float16)
        view[:, 0] = k2
        view[:, 1] = v2
        assert client.append_layers_staged(seq, region, 4096, 13) == 33
    assert list(client.get_sequence(seq).layer_lengths) == [33, 33, 33]
    check_every_layer(client, seq, layout, rng, np.concatenate([ek1, ek2], axis=1),
                      np.concatenate([ev1, ev2], axis=1))
    client.release(seq)


def test_append_layers_refusals_change_nothing(client):
    rng = np.random.default_rng(72)
    name, layout = make_layout(client, "f32")
    seq = client.create_sequence(name)
    k, v, ek, ev = random_layers(rng, layout, 5)
    assert client.append_layers(seq, k, v, step_id=4242) == 5
    # A resend of the same step id is answered without appending again.
    assert client.append_layers(seq, k, v, step_id=4242) == 5
    # Client-side checks: layer count, token counts, staged range.
    with pytest.raises(ValueError):
        client.append_layers(seq, k[:1], v[:1])
    with pytest.raises(ValueError):
        client.append_layers(seq, [k[0], k[1][:2]], [v[0], v[1][:2]])
    with client.open_staging(4096) as region:
        with pytest.raises(ValueError):
            client.append_layers_staged(seq, region, 0, 64)
    # A step in progress (layer 1 ahead): the daemon refuses before touching any layer.
    (k1, _), (v1, _) = random_kv(rng, layout, 3)
    client.append(seq, 1, k1, v1)
    with pytest.raises(headwise.HeadwiseError) as e:
        client.append_layers(seq, k, v)
    assert e.value.code == "FAILED_PRECONDITION"
    assert list(client.get_sequence(seq).layer_lengths) == [5, 8]
    client.release(seq)
