"""Losses: CE vs numpy, chunked CE == plain CE (values, grads, memory), MTP targets on a packed
row, load balancing vs a direct computation, micro-batch decomposition, loss_fn on a tiny model."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3next_jax.config import tiny
from qwen3next_jax.model import Qwen3Next
from qwen3next_jax.ops import moe as moe_ops
from qwen3next_jax.training import losses


def _np_ce(logits, targets, mask):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    tgt = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return np.sum((lse - tgt) * mask), np.sum(mask)


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 7)).astype(np.int32)
    mask = (rng.random((2, 7)) > 0.3).astype(np.int32)
    s, c = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    ref_s, ref_c = _np_ce(logits, targets, mask)
    assert s.dtype == jnp.float32 and c.dtype == jnp.float32
    np.testing.assert_allclose(float(s), ref_s, rtol=1e-6)
    assert float(c) == ref_c
    # bf16 logits are upcast before the softmax.
    s16, _ = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets, mask)
    ref16, _ = _np_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), targets, mask)
    np.testing.assert_allclose(float(s16), ref16, rtol=1e-5)


def _plain(h, w, t, m, dtype=jnp.float32):
    logits = jnp.einsum(
        "btd,dv->btv", h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
    )
    s, c = losses.cross_entropy(logits, t, m)
    return s / c


def _ce_inputs(seed, B, T, D, V, drop):
    """h [B,T,D], w [D,V] float32, targets and a loss mask with about `drop` of it 0."""
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) / 4, jnp.float32)
    t = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    m = jnp.asarray(rng.random((B, T)) > drop, jnp.int32)
    return h, w, t, m


@pytest.mark.parametrize("chunk_tokens", [16, 1, 10_000])
def test_chunked_equals_plain_values_and_grads(chunk_tokens):
    B, T, D, V = 2, 37, 16, 50  # T not a multiple of the chunk: exercises the padding
    h, w, t, m = _ce_inputs(1, B, T, D, V, 0.2)

    def chunked(h, w):
        s, c = losses.chunked_cross_entropy(
            h, w, t, m, chunk_tokens=chunk_tokens, dtype=jnp.float32
        )
        return s / c

    v1, g1 = jax.value_and_grad(lambda h, w: _plain(h, w, t, m), argnums=(0, 1))(h, w)
    v2, g2 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    np.testing.assert_allclose(g2[0], g1[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g2[1], g1[1], rtol=1e-5, atol=1e-7)


def test_chunked_bf16_matches_plain_bf16():
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(2, 32, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 40)) / 4, jnp.float32)
    t = jnp.asarray(rng.integers(0, 40, size=(2, 32)), jnp.int32)
    m = jnp.ones((2, 32), jnp.int32)
    s, c = losses.chunked_cross_entropy(h, w, t, m, chunk_tokens=16, dtype=jnp.bfloat16)
    np.testing.assert_allclose(s / c, _plain(h, w, t, m, jnp.bfloat16), rtol=1e-5)


def test_chunked_bf16_gradients_match_plain_bf16():
    """The forward-formed gradients (logit gradient rounded to bf16 before its two products) stay
    within bf16 rounding of plain autodiff, whose logit cotangent stays float32."""
    B, T, D, V = 2, 48, 32, 96
    h, w, t, m = _ce_inputs(3, B, T, D, V, 0.3)

    def chunked(h, w):
        s, c = losses.chunked_cross_entropy(h, w, t, m, chunk_tokens=32, dtype=jnp.bfloat16)
        return s / c

    v1, g1 = jax.value_and_grad(lambda h, w: _plain(h, w, t, m, jnp.bfloat16), (0, 1))(h, w)
    v2, g2 = jax.jit(jax.value_and_grad(chunked, (0, 1)))(h, w)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    assert g2[0].dtype == jnp.float32 and g2[1].dtype == jnp.float32
    for a, b in zip(g2, g1, strict=True):
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-2


def test_chunked_sharded_equals_unsharded():
    """Rows over ('data', 'fsdp') and the vocabulary over 'tensor' (8 devices): the same loss and
    gradients as one device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qwen3next_jax import sharding

    B, T, D, V = 4, 24, 16, 64
    h, w, t, m = _ce_inputs(4, B, T, D, V, 0.2)

    def loss(h, w, t, m):
        s, c = losses.chunked_cross_entropy(h, w, t, m, chunk_tokens=32, dtype=jnp.float32)
        return s / c

    grad = jax.jit(jax.value_and_grad(loss, (0, 1)))
    v1, g1 = grad(h, w, t, m)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    v2, g2 = grad(
        put(h, rows.spec), put(w, P(None, "tensor")), put(t, rows.spec), put(m, rows.spec)
    )
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    np.testing.assert_allclose(g2[0], g1[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g2[1], g1[1], rtol=1e-5, atol=1e-7)


def test_chunked_backward_memory_is_bounded():
    B, T, D, V = 1, 1024, 64, 32768  # full f32 logits: 128 MiB
    args = (
        jax.ShapeDtypeStruct((B, T, D), jnp.float32),
        jax.ShapeDtypeStruct((D, V), jnp.float32),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
    )

    def plain(h, w, t, m):
        return _plain(h, w, t, m)

    def chunked(h, w, t, m):
        s, c = losses.chunked_cross_entropy(h, w, t, m, chunk_tokens=64, dtype=jnp.float32)
        return s / c

    def temp_bytes(f):
        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunk = temp_bytes(plain), temp_bytes(chunked)
    logits_bytes = T * V * 4
    assert full >= logits_bytes  # the plain backward holds at least one [T, V] f32 array
    assert chunk < logits_bytes / 4, (chunk, full)


def test_mtp_targets_on_packed_rows():
    # Row 0: documents [5 6 7 EOS] [8 9 EOS] [10 11 12 13...] (EOS = 1), cut by the window end, as
    # qwen3next_jax.data.pipeline packs them. Row 1: one short document, then padding.
    targets = np.array(
        [[6, 7, 1, 8, 9, 1, 10, 11, 12, 13], [6, 7, 8, 9, 0, 0, 0, 0, 0, 0]], np.int32
    )
    segment_ids = np.array(
        [[1, 1, 1, 1, 2, 2, 2, 3, 3, 3], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], np.int32
    )
    loss_mask = np.array([[1, 1, 1, 0, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], np.int32)
    t0, m0 = losses.mtp_targets(targets, loss_mask, segment_ids, 0)
    np.testing.assert_array_equal(
        t0, [[7, 1, 0, 0, 1, 0, 0, 12, 13, 0], [7, 8, 9, 0, 0, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        m0, [[1, 1, 0, 0, 1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    )
    t1, m1 = losses.mtp_targets(targets, loss_mask, segment_ids, 1)
    np.testing.assert_array_equal(
        t1, [[1, 0, 0, 0, 0, 0, 0, 13, 0, 0], [8, 9, 0, 0, 0, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        m1, [[1, 0, 0, 0, 0, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]
    )
    assert m1.dtype == loss_mask.dtype
    t9, m9 = losses.mtp_targets(targets, loss_mask, segment_ids, 9)
    assert not np.any(m9) and not np.any(t9)


# ------------------------------------------------------------------------------ router losses
L, N, E, K = 3, 40, 8, 2


@jax.jit
def _router_from_logits(logits_LNE, valid_N):
    """The ModelOutput.router dict, built the way SparseMoE builds it."""
    out = {k: [] for k in ("counts_E", "prob_sum_E", "num_tokens", "z_sum", "entropy_sum")}
    for logits_NE in logits_LNE:
        _, idx_NK, probs_NE = moe_ops.router_topk(logits_NE, K)
        v = valid_N.astype(jnp.float32)
        counts = jnp.zeros((E,), jnp.float32).at[idx_NK.reshape(-1)].add(jnp.repeat(v, K))
        lse = jax.nn.logsumexp(logits_NE, -1)
        out["counts_E"].append(jax.lax.stop_gradient(counts))
        out["prob_sum_E"].append(v @ probs_NE)
        out["num_tokens"].append(v.sum())
        out["z_sum"].append(jnp.sum(v * lse * lse))
        ent = -jnp.sum(probs_NE * jnp.log(probs_NE), -1)
        out["entropy_sum"].append(jnp.sum(v * ent))
    router = {k: jnp.stack(v) for k, v in out.items()}
    router["dropped_fraction"] = jnp.zeros((logits_LNE.shape[0],), jnp.float32)
    return router


def _logits(seed=0):
    return jax.random.normal(jax.random.key(seed), (L, N, E)) * 2


def test_load_balancing_matches_direct_computation():
    logits = _logits()
    valid = np.ones(N, bool)
    valid[-5:] = False
    router = _router_from_logits(logits, jnp.asarray(valid))
    got = losses.load_balancing_loss(router, E, K)
    # Direct: per layer, from the routing of the valid tokens only.
    ref = 0.0
    for layer in np.asarray(logits, np.float64):
        x = layer[valid]
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, -1)[:, :K]
        f = np.bincount(top.reshape(-1), minlength=E) / (K * len(x))
        ref += E * np.sum(f * p.mean(0))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    # Same as the op-level helper.
    f_E, P_E = moe_ops.load_balancing_terms(
        jax.nn.softmax(logits[0]), jax.lax.top_k(logits[0], K)[1], E, jnp.asarray(valid)
    )
    one_layer = losses.load_balancing_loss(jax.tree.map(lambda a: a[:1], router), E, K)
    np.testing.assert_allclose(float(one_layer), float(E * jnp.sum(f_E * P_E)), rtol=1e-6)


def test_uniform_routing_gives_one_per_layer():
    n = 16  # every expert gets exactly k*n/E slots and mean prob 1/E
    router = {
        "counts_E": jnp.full((L, E), K * n / E),
        "prob_sum_E": jnp.full((L, E), n / E),
        "num_tokens": jnp.full((L,), float(n)),
    }
    assert float(losses.load_balancing_loss(router, E, K)) == L
    assert float(losses.load_balancing_loss(jax.tree.map(lambda a: a[:1], router), E, K)) == 1.0


def test_microbatch_sum_equals_full_batch_values_and_grads():
    logits = _logits(3)
    valid = jnp.asarray(np.random.default_rng(0).random(N) > 0.25)
    full = _router_from_logits(logits, valid)
    g_counts, g_tokens = full["counts_E"], full["num_tokens"]

    def full_loss(lg):
        r = _router_from_logits(lg, valid)
        return losses.load_balancing_loss(r, E, K) + losses.z_loss(r)

    def microbatch_sum(lg):
        total = 0.0
        for i in range(4):  # 4 micro-batches of N/4 tokens
            sl = slice(i * N // 4, (i + 1) * N // 4)
            r = _router_from_logits(lg[:, sl], valid[sl])
            total += losses.load_balancing_loss(
                r, E, K, global_counts_LE=g_counts, global_tokens_L=g_tokens
            )
            total += losses.z_loss(r, global_tokens_L=g_tokens)
        return total

    v_full, g_full = jax.jit(jax.value_and_grad(full_loss))(logits)
    v_mb, g_mb = jax.jit(jax.value_and_grad(microbatch_sum))(logits)
    np.testing.assert_allclose(float(v_mb), float(v_full), rtol=1e-6)
    np.testing.assert_allclose(g_mb, g_full, rtol=1e-5, atol=1e-8)
    assert float(jnp.abs(g_full).max()) > 0  # P carries a gradient
    # Gradient wrt prob_sum itself: E * f_global / N_global per micro-batch, as for the full batch.
    d_prob = jax.grad(
        lambda ps: losses.load_balancing_loss(
            {**full, "prob_sum_E": ps}, E, K, global_counts_LE=g_counts, global_tokens_L=g_tokens
        )
    )(full["prob_sum_E"])
    np.testing.assert_allclose(d_prob, E * g_counts / (K * g_tokens[:, None] ** 2), rtol=1e-6)


def test_z_loss_and_router_metrics():
    logits = _logits(4)
    router = _router_from_logits(logits, jnp.ones((N,), bool))
    lse = np.asarray(jax.nn.logsumexp(logits, -1))
    np.testing.assert_allclose(float(losses.z_loss(router)), np.mean(lse**2), rtol=1e-5)
    m = losses.router_metrics(router, E, K)
    load = np.asarray(router["counts_E"]) * E / (K * N)
    assert float(m["expert_load_max"]) == pytest.approx(load.max())
    assert float(m["expert_load_min"]) == pytest.approx(load.min())
    p = np.asarray(jax.nn.softmax(logits, -1))
    assert float(m["router_entropy"]) == pytest.approx(
        -np.mean(np.sum(p * np.log(p), -1)), rel=1e-5
    )
    assert float(m["dropped_fraction"]) == 0.0


# --------------------------------------------------------------------------------- loss_fn
class LossCfg(NamedTuple):  # hashable, so it can be a static jit argument
    mtp_weight: float = 0.1
    lb_coef: float = 1e-3
    z_coef: float = 0.0
    ce_chunk_tokens: int = 0


@pytest.fixture(scope="module")
def model():
    # Shapes from eval_shape, values from numpy (no eager RNG initialisation: slow on 2 cores).
    abstract = nnx.eval_shape(lambda: Qwen3Next(tiny(), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), state)
    return nnx.merge(graphdef, state)


def _batch(B=4, T=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 512, size=(B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[0, 6:] = 2  # row 0 packs two documents, the first ending with EOS at position 5
    tokens[0, 5] = 1
    seg[1, 12:] = 0  # row 1 is padded
    loss_mask = (seg != 0).astype(np.int32)
    loss_mask[0, 5] = 0
    pos = np.where(seg[0] == 2, np.arange(T) - 6, np.arange(T))
    positions = np.tile(np.arange(T), (B, 1)).astype(np.int32)
    positions[0] = pos
    positions[seg == 0] = 0
    return {
        "inputs": jnp.asarray(np.where(seg != 0, tokens[:, :-1], 0)),
        "targets": jnp.asarray(np.where(seg != 0, tokens[:, 1:], 0)),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(positions),
        "loss_mask": jnp.asarray(loss_mask),
    }


class _Replay:
    """Stands in for the model inside loss_fn, returning an output computed once: many loss
    configurations then cost one model compile (slow on a 2-core box) instead of one each."""

    def __init__(self, out, w_DV, cfg):
        self.out, self.w_DV, self.cfg = out, w_DV, cfg

    def __call__(self, input_ids, segment_ids=None, positions=None, *, compute_logits=True):
        return self.out

    def lm_head_weight(self):
        return self.w_DV


@pytest.fixture(scope="module")
def full_batch(model):
    batch = _batch()
    out = nnx.jit(lambda m, b: m(b["inputs"], b["segment_ids"], b["positions"]))(model, batch)
    return batch, out, model.lm_head_weight()


@jax.jit(static_argnames=("cfg",))
def _replay_loss(out, w_DV, batch, cfg, g):
    return losses.loss_fn(_Replay(out, w_DV, tiny()), batch, cfg, **g)


def test_loss_fn_reduces_to_cross_entropy(full_batch):
    batch, out, w = full_batch
    loss, aux = _replay_loss(out, w, batch, LossCfg(0.0, 0.0, 0.0, 0), {})
    s, c = losses.cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
    np.testing.assert_allclose(float(loss), float(s / c), rtol=1e-6)
    assert float(aux["num_tokens"]) == float(np.sum(batch["loss_mask"]))
    # Every term on: finite, present, and combined as documented.
    loss, aux = _replay_loss(out, w, batch, LossCfg(0.1, 1e-3, 1e-4, 0), {})
    for k in ("ce", "mtp_loss", "lb_loss", "z_loss", "expert_load_max", "router_entropy"):
        assert np.isfinite(float(aux[k])), k
    assert aux["mtp_loss_per_depth"].shape == (1,)
    expected = aux["ce"] + 0.1 * aux["mtp_loss"] + 1e-3 * aux["lb_loss"] + 1e-4 * aux["z_loss"]
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    t0, m0 = losses.mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], 0)
    s0, c0 = losses.cross_entropy(out.mtp_logits[0], t0, m0)
    np.testing.assert_allclose(float(aux["mtp_loss"]), float(s0 / c0), rtol=1e-6)
    # Chunked CE on the hidden states gives the same numbers (float32 compute in tiny()).
    loss_c, aux_c = _replay_loss(out, w, batch, LossCfg(0.1, 1e-3, 1e-4, 8), {})
    np.testing.assert_allclose(float(loss_c), float(loss), rtol=1e-5)
    np.testing.assert_allclose(aux_c["mtp_sum"], aux["mtp_sum"], rtol=1e-5)


def test_loss_fn_microbatches_sum_to_full_batch(model, full_batch):
    """The real model in loss_fn (chunked path, compute_logits=False) on 2 micro-batches of 2 rows,
    with the global denominators, sums to the full-batch loss."""
    batch, out, w = full_batch
    cfg = LossCfg(0.1, 1e-2, 1e-3, 8)
    mtp_count = [
        float(
            np.sum(
                losses.mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], d)[1]
            )
        )
        for d in range(model.cfg.num_mtp_layers)
    ]
    g = dict(
        global_counts_LE=out.router["counts_E"],
        global_tokens_L=out.router["num_tokens"],
        num_tokens_global=jnp.sum(batch["loss_mask"]).astype(jnp.float32),
        mtp_tokens_global=jnp.asarray(mtp_count),
    )
    full, _ = _replay_loss(out, w, batch, cfg, g)
    full_local, _ = _replay_loss(out, w, batch, cfg, {})
    np.testing.assert_allclose(float(full), float(full_local), rtol=1e-6)

    @nnx.jit
    def run(model, batch, g):
        return losses.loss_fn(model, batch, cfg, **g)

    parts = [
        run(model, jax.tree.map(lambda a, i=i: a[2 * i : 2 * i + 2], batch), g) for i in range(2)
    ]
    np.testing.assert_allclose(float(parts[0][0] + parts[1][0]), float(full), rtol=1e-5)
    assert all(np.isfinite(float(p[1]["ce"])) for p in parts)
