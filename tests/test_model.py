"""Qwen3Next model: packed-document isolation, causality, MTP, scan/remat/jit equivalence, router
init, output contract, bf16 and sharded execution.

One small config (8 layers = 2 scanned super-blocks, 2 MTP depths, gdn_chunk_size 16) and one
input shape are shared by the tests, so each jitted graph compiles once. Parameters are drawn
with numpy into the model's own structure (no per-op init compiles), with every norm weight,
A_log and dt_bias moved off its init so no path hides behind an identity.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3next_jax import sharding
from qwen3next_jax.config import tiny
from qwen3next_jax.layers.moe import SparseMoE
from qwen3next_jax.model import Qwen3Next, positions_from_segments

CFG = tiny(gdn_chunk_size=16, num_hidden_layers=8, num_mtp_layers=2)
V = CFG.vocab_size
K = CFG.num_experts_per_tok
DM = CFG.num_mtp_layers
NUM_MOE = CFG.num_hidden_layers + DM
B, T = 2, 80
# These tests compare graphs, not kernels' speed: cheap XLA:CPU compiles keep the file fast.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _graphdef(cfg):
    """The graph definition of a model built with ``cfg``, without materialising parameters."""
    return nnx.split(nnx.eval_shape(lambda: Qwen3Next(cfg, rngs=nnx.Rngs(0))))[0]


def _random_state(cfg, seed=0, std=0.05):
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen3Next(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, v):
        name = jax.tree_util.keystr(path)
        shape = v.shape
        if "A_log" in name:
            x = np.log(rng.uniform(0.5, 8.0, shape))
        elif "dt_bias" in name or "mixer']['norm" in name:  # GDN gated norm: plain gain, init 1
            x = 1.0 + 0.3 * rng.normal(size=shape)
        elif "norm" in name:  # zero-centred norms: gain 1 + w, init zero
            x = 0.3 * rng.normal(size=shape)
        else:
            x = std * rng.normal(size=shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def model():
    return nnx.merge(_graphdef(CFG), _random_state(CFG))


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def _run(graphdef, state, ids, seg):
    return nnx.merge(graphdef, state)(ids, seg)


def _forward(model, ids, seg=None):
    graphdef, state = nnx.split(model)
    return _run(graphdef, state, ids, seg)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def _grad(graphdef, state, ids, seg, w_logits, w_mtp):
    """d/dstate of sum(logits * w_logits) + sum(mtp_logits * w_mtp); returns (loss, logits, g)."""

    def loss(state):
        out = nnx.merge(graphdef, state)(ids, seg)
        total = jnp.sum(out.logits * w_logits) + jnp.sum(out.mtp_logits * w_mtp)
        return total, out.logits

    (value, logits), g = jax.value_and_grad(loss, has_aux=True)(state)
    return value, logits, g


def _ids(key, shape):
    return jax.random.randint(jax.random.key(key), shape, 1, V, dtype=jnp.int32)


IDS = _ids(3, (B, T))
# Two documents and padding in row 0, one document (ending in padding) in row 1.
SEG = jnp.array([[1] * 30 + [2] * 40 + [0] * 10, [7] * 75 + [0] * 5], jnp.int32)


@pytest.fixture(scope="module")
def eager_out(model):
    """The model run without jit (op by op), on IDS / SEG."""
    return model(IDS, SEG)


# -------------------------------------------------------------------- packed-document isolation
def test_positions_restart_per_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(
        positions_from_segments(seg),
        [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]],
    )


def test_packed_documents_are_isolated(model):
    """A document's logits (and MTP logits whose targets are in the document) inside a packed row
    equal those of the document alone. Lengths 13, 37, 20 with chunk 16: boundaries at 13 and 50
    fall inside GDN chunks, documents 2 and 3 straddle chunk boundaries (16, 32, 48, 64)."""
    lens = (13, 37, 20)
    docs = [_ids(10 + i, (n,)) for i, n in enumerate(lens)]
    pad = T - sum(lens)
    packed = jnp.stack([jnp.concatenate([*docs, _ids(20, (pad,))]), _ids(21, (T,))])
    seg = jnp.stack(
        [
            jnp.concatenate(
                [jnp.full((n,), i + 1, jnp.int32) for i, n in enumerate(lens)]
                + [jnp.zeros((pad,), jnp.int32)]
            ),
            jnp.full((T,), 4, jnp.int32),
        ]
    )
    out_p = _forward(model, packed, seg)
    # Each document alone at the start of its own row (no segment ids, default positions); what
    # follows it cannot matter (causality, tested below).
    alone = jnp.stack(
        [jnp.concatenate([d, _ids(30 + i, (T - len(d),))]) for i, d in enumerate(docs)]
    )
    alone = jnp.concatenate([alone, alone[:1]])  # 4 rows -> two calls of the common shape
    outs = [_forward(model, alone[:2]), _forward(model, alone[2:])]
    start = 0
    for i, n in enumerate(lens):
        ref = outs[i // 2]
        got, want = out_p.logits[0, start : start + n], ref.logits[i % 2, :n]
        assert _rel(got, want) < 1e-5, (i, _rel(got, want))
        for d in range(CFG.num_mtp_layers):
            m = n - 1 - d  # positions whose depth-d input token is still in the document
            got, want = out_p.mtp_logits[d, 0, start : start + m], ref.mtp_logits[d, i % 2, :m]
            assert _rel(got, want) < 1e-5, (i, d, _rel(got, want))
        start += n
    assert np.all(np.isfinite(np.asarray(out_p.logits)))
    # Sanity: the neighbours really would change the answer without the resets.
    no_reset = _forward(model, packed)
    assert _rel(no_reset.logits[0, 13:50], outs[0].logits[1, :37]) > 1e-2


def test_packed_documents_bit_exact(model):
    """Changing a token of one document leaves every other document's logits bit-identical."""
    base = _forward(model, IDS, SEG)
    for tok in (7, 100, 300):
        out = _forward(model, IDS.at[0, 5].set(tok), SEG)
        np.testing.assert_array_equal(out.logits[0, 30:70], base.logits[0, 30:70])
        np.testing.assert_array_equal(out.logits[1], base.logits[1])


# ---------------------------------------------------------------------------------- causality
def test_causality_by_perturbation(model):
    """Changing the token at t' leaves logits at t < t' bit-identical (and MTP depth d at
    t < t' - 1 - d), and changes the logits at t'."""
    base = _forward(model, IDS)
    for tp in (5, 16, 23, 79):  # inside a chunk, at a chunk start, mid-chunk, last position
        ids2 = IDS.at[:, tp].set((IDS[:, tp] + 7) % V)
        out = _forward(model, ids2)
        np.testing.assert_array_equal(out.logits[:, :tp], base.logits[:, :tp])
        assert not np.allclose(out.logits[:, tp], base.logits[:, tp])
        for d in range(CFG.num_mtp_layers):
            lim = tp - 1 - d
            np.testing.assert_array_equal(out.mtp_logits[d, :, :lim], base.mtp_logits[d, :, :lim])
            # Depth d at t' - 1 - d reads the token at t' directly.
            assert not np.allclose(out.mtp_logits[d, :, lim], base.mtp_logits[d, :, lim])


def test_causality_by_gradient(model):
    """With every token distinct, the gradient w.r.t. embedding row ids[b, s] is the gradient
    w.r.t. the input embedding at (b, s). Position t's logits must have exactly zero gradient
    w.r.t. inputs after t, before its document's start, and in the other row, and a nonzero one
    at t and at the document's first token. MTP depth d at t reads inputs up to t + 1 + d."""
    ids = jax.random.permutation(jax.random.key(4), jnp.arange(1, V))[: B * T]
    ids = ids.reshape(B, T).astype(jnp.int32)
    graphdef, state = nnx.split(model)
    cases = [(t, w) for w in range(1 + DM) for t in (0, 13, 16, 40, 63)]
    for t, w in cases:
        w_logits = jnp.zeros((B, T, V)).at[0, t].set(1.0 if w == 0 else 0.0)
        w_mtp = jnp.zeros((DM, B, T, V))
        if w:
            w_mtp = w_mtp.at[w - 1, 0, t].set(1.0)
        _, _, g = _grad(graphdef, state, ids, SEG, w_logits, w_mtp)
        norms = np.linalg.norm(np.asarray(g["embed_VD"][...])[ids], axis=-1)  # [B, T]
        first = 0 if t < 30 else 30  # SEG row 0: documents [0, 30) and [30, 70)
        last = t + w  # main (w = 0) reads inputs <= t; MTP depth w - 1 reads <= t + w
        assert np.all(norms[0, last + 1 :] == 0.0), (t, w)
        # Earlier documents: zero up to rounding (see test_packed_documents_bit_exact).
        assert np.all(norms[0, :first] <= 1e-6 * norms.max()), (t, w)
        assert np.all(norms[1] == 0.0), (t, w)  # other batch rows never leak
        assert norms[0, last] > 0 and norms[0, first] > 0 and norms[0, t] > 0, (t, w)


# ----------------------------------------------------------------------------------------- MTP
def _rms_zc(x, w, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * (1.0 + w)


def test_mtp_matches_spec(model, eager_out):
    """spec §2.6.2, written out: e = norm(Embed(x_{t+1+d})), ĥ = norm(h), z = fc([e; ĥ]),
    z' = decoder layer, h' = norm(z'), logits = h' @ lm_head; depth d+1 chains from h'."""
    out = _forward(model, IDS, SEG)
    eps, D = CFG.rms_norm_eps, CFG.hidden_size
    E = model.embed_VD[...]
    W = model.lm_head_DV[...]
    pos = positions_from_segments(SEG)
    valid = SEG != 0

    h = eager_out.hidden
    # out.hidden is the post-final-norm main hidden state.
    assert _rel(out.hidden, h) < 1e-5
    assert _rel(out.logits, h @ W) < 1e-5
    assert out.mtp_logits.shape == (CFG.num_mtp_layers, B, T, V)
    for d, head in enumerate(model.mtp):
        nxt = jnp.concatenate([IDS[:, d + 1 :], jnp.zeros((B, d + 1), IDS.dtype)], axis=1)
        e = _rms_zc(E[nxt], head.pre_fc_norm_embedding.weight[...], eps)
        hh = _rms_zc(h, head.pre_fc_norm_hidden.weight[...], eps)
        fc = head.fc_2DD[...]  # [2D, D]: rows [0, D) read the embedding
        z = e @ fc[:D] + hh @ fc[D:]
        z2, _ = head.layer(z, pos, SEG, valid)
        h = _rms_zc(z2, head.norm.weight[...], eps)
        assert _rel(out.mtp_hidden[d], h) < 1e-5, d
        # Valid positions only: depth d at t predicts t + 2 + d.
        assert _rel(out.mtp_logits[d, :, : T - 2 - d], (h @ W)[:, : T - 2 - d]) < 1e-5, d
    # The norms are not identities here, and swapping the concat order would change the answer.
    assert float(jnp.max(jnp.abs(model.mtp[0].pre_fc_norm_embedding.weight[...]))) > 0.1
    e0 = _rms_zc(E[IDS[:, 1:]], model.mtp[0].pre_fc_norm_embedding.weight[...], eps)
    h0 = _rms_zc(out.hidden[:, :-1], model.mtp[0].pre_fc_norm_hidden.weight[...], eps)
    fc = model.mtp[0].fc_2DD[...]
    right = jnp.concatenate([e0, h0], -1) @ fc
    wrong = jnp.concatenate([h0, e0], -1) @ fc
    assert _rel(wrong, right) > 0.1


# ------------------------------------------------------------------------ execution equivalence
def test_scan_unrolled_remat_equivalent(model):
    """scan_layers=False and remat_policy='full' reuse the same parameters (identical structure)
    and give the same logits; remat gives the same gradients."""
    assert model.num_blocks == 2
    graphdef, state = nnx.split(model)
    g_unrolled = _graphdef(CFG.replace(scan_layers=False))
    g_remat = _graphdef(CFG.replace(remat_policy="full"))
    assert not nnx.merge(g_unrolled, state).cfg.scan_layers

    ref = _forward(model, IDS, SEG)
    unrolled = _run(g_unrolled, state, IDS, SEG)
    assert _rel(unrolled.logits, ref.logits) < 1e-6
    assert _rel(unrolled.mtp_logits, ref.mtp_logits) < 1e-6
    np.testing.assert_array_equal(unrolled.router["counts_E"], ref.router["counts_E"])

    rng = np.random.default_rng(5)
    w_logits = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    w_mtp = jnp.asarray(rng.normal(size=(DM, B, T, V)), jnp.float32)
    l0, logits0, g0 = _grad(graphdef, state, IDS, SEG, w_logits, w_mtp)
    l1, logits1, g1 = _grad(g_remat, state, IDS, SEG, w_logits, w_mtp)
    # Other compiled graphs (value_and_grad, remat): same math, rounding differs at ~2e-6.
    assert _rel(logits1, logits0) < 1e-5
    assert _rel(logits0, ref.logits) < 1e-5
    assert abs(float(l1) - float(l0)) <= 1e-6 * float(jnp.sum(jnp.abs(ref.logits * w_logits)))
    g0, g1 = nnx.to_pure_dict(g0), nnx.to_pure_dict(g1)
    flat0 = jax.tree_util.tree_flatten_with_path(g0)[0]
    for (path, a), b in zip(flat0, jax.tree.leaves(g1), strict=True):
        assert np.max(np.abs(np.asarray(a))) > 0, jax.tree_util.keystr(path)
        assert _rel(b, a) < 1e-5, jax.tree_util.keystr(path)
    # Every block's parameters get their own gradient (the scan does not reuse block 0).
    wq = np.abs(np.asarray(g0["blocks"]["layers"][3]["mixer"]["wq_DNH"]))
    assert np.all(wq.reshape(2, -1).max(axis=1) > 0)


def test_jit_matches_eager(model, eager_out):
    # Default XLA options here: FAST's -O0 reassociates float sums (~3e-6 relative).
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s: nnx.merge(graphdef, s)(IDS, SEG))(state)
    assert _rel(jitted.logits, eager_out.logits) < 1e-6
    assert _rel(jitted.mtp_logits, eager_out.mtp_logits) < 1e-6
    for k in ("counts_E", "num_tokens"):
        np.testing.assert_array_equal(jitted.router[k], eager_out.router[k])


# ------------------------------------------------------------------------------------- router
def test_router_init_normalisation():
    """σ-MoE init: every expert's router column has the same L2 norm, std * sqrt(D); without
    the option the norms differ, and the option only rescales columns."""
    cfg = tiny(num_experts=16, num_experts_per_tok=4)
    target = cfg.initializer_range * np.sqrt(cfg.hidden_size)
    on = np.asarray(SparseMoE(cfg, rngs=nnx.Rngs(0)).router_DE[...])
    off_cfg = cfg.replace(router_init_normalize=False)
    off = np.asarray(SparseMoE(off_cfg, rngs=nnx.Rngs(0)).router_DE[...])
    assert on.shape == (cfg.hidden_size, cfg.num_experts)
    np.testing.assert_allclose(np.linalg.norm(on, axis=0), target, rtol=1e-5)
    norms_off = np.linalg.norm(off, axis=0)
    assert np.ptp(norms_off) > 1e-2 * norms_off.mean()
    np.testing.assert_allclose(
        off / norms_off, on / np.linalg.norm(on, axis=0), rtol=1e-5, atol=1e-7
    )


# ---------------------------------------------------------------------------- output contract
def test_output_contract(model):
    out = _forward(model, IDS, SEG)
    assert out.logits.shape == (B, T, V) and out.logits.dtype == jnp.float32
    assert out.mtp_logits.shape == (CFG.num_mtp_layers, B, T, V)
    assert out.mtp_logits.dtype == jnp.float32
    assert out.hidden.shape == (B, T, CFG.hidden_size)
    assert out.mtp_hidden.shape == (CFG.num_mtp_layers, B, T, CFG.hidden_size)
    r = out.router
    assert r["counts_E"].shape == (NUM_MOE, CFG.num_experts)
    assert r["prob_sum_E"].shape == (NUM_MOE, CFG.num_experts)
    for key in ("num_tokens", "z_sum", "entropy_sum", "dropped_fraction"):
        assert r[key].shape == (NUM_MOE,), key
    valid = int(jnp.sum(SEG != 0))
    np.testing.assert_array_equal(r["num_tokens"], valid)
    np.testing.assert_array_equal(r["counts_E"].sum(-1), K * valid)
    np.testing.assert_allclose(r["prob_sum_E"].sum(-1), valid, rtol=1e-5)
    assert np.all(np.asarray(r["counts_E"]) >= 0)
    # Padding is excluded: changing padding tokens changes no routing statistic. (The first DM
    # padding tokens after a document are MTP inputs of its last valid positions; keep them.)
    near = jnp.zeros_like(SEG, bool).at[0, 70:72].set(True).at[1, 75:77].set(True)
    ids2 = jnp.where((SEG == 0) & ~near, (IDS + 11) % V, IDS)
    out2 = _forward(model, ids2, SEG)
    np.testing.assert_array_equal(out2.router["counts_E"], r["counts_E"])
    np.testing.assert_allclose(out2.router["prob_sum_E"], r["prob_sum_E"], rtol=1e-6)
    np.testing.assert_array_equal(out2.logits[SEG != 0], out.logits[SEG != 0])
    # Without segment ids every token counts.
    r3 = _forward(model, IDS).router
    np.testing.assert_array_equal(r3["counts_E"].sum(-1), K * B * T)
    np.testing.assert_array_equal(r3["num_tokens"], B * T)

    # num_mtp_layers=0: no MTP logits, one router row per main layer (shapes only).
    cfg0 = CFG.replace(num_mtp_layers=0)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3Next(cfg0, rngs=nnx.Rngs(0))))
    shapes = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(IDS, SEG), abstract)
    assert shapes.mtp_logits is None and shapes.mtp_hidden is None
    assert shapes.logits.shape == (B, T, V) and shapes.logits.dtype == jnp.float32
    assert shapes.router["counts_E"].shape == (CFG.num_hidden_layers, CFG.num_experts)


# ----------------------------------------------------------------------------------- numerics
def test_bf16_close_to_fp32():
    """dtype='bfloat16' with the same (fp32 master) parameters: float32 logits, bf16 activations,
    logits within 3% (relative Frobenius error over real tokens) of the fp32 model. Parameters
    at the init scale (std 0.02); a few top-k routing choices flip under bf16, so the error is
    measured over all tokens rather than at its worst one."""
    state = _random_state(CFG, seed=2, std=CFG.initializer_range)
    ref = _run(_graphdef(CFG), state, IDS, SEG)
    out = _run(_graphdef(CFG.replace(dtype="bfloat16")), state, IDS, SEG)
    assert out.logits.dtype == jnp.float32 and out.mtp_logits.dtype == jnp.float32
    assert out.hidden.dtype == jnp.bfloat16
    real = np.asarray(SEG) != 0

    def fro(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert np.all(np.isfinite(np.asarray(out.logits)))
    assert fro(out.logits[real], ref.logits[real]) < 3e-2
    assert fro(out.mtp_logits[:, real], ref.mtp_logits[:, real]) < 3e-2
    assert fro(out.logits[real], ref.logits[real]) > 1e-4  # it really ran in bf16


# ----------------------------------------------------------------------------------- sharding
def test_sharded_forward_matches_unsharded(model):
    """data 2 x fsdp 2 x expert 2 on 8 CPU devices, parameters placed by their logical axes: the
    jitted forward equals the unsharded one."""
    ids = _ids(12, (8, T))
    seg = jnp.concatenate([SEG] * 4)
    # The unsharded reference, two rows at a time (rows are independent; one compiled shape).
    refs = [_forward(model, ids[i : i + 2], seg[i : i + 2]) for i in range(0, 8, 2)]
    ref_logits = jnp.concatenate([r.logits for r in refs])
    ref_mtp = jnp.concatenate([r.mtp_logits for r in refs], axis=1)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    graphdef, state = nnx.split(model)

    with sharding.use_mesh(mesh):
        ctx = sharding.current()

        def place(v):
            spec = sharding.logical_to_spec(v.get_metadata()["axes"], ctx.rules, mesh)
            return v.replace(jax.device_put(v[...], jax.sharding.NamedSharding(mesh, spec)))

        sharded = jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        experts = sharded["blocks"]["layers"][0]["ffn"]["w_gate_EDF"][...]
        assert experts.sharding.spec[:3] == (None, "expert", "fsdp")  # [layers, E, D, F]
        ids_s = jax.device_put(ids, sharding.named_sharding(("batch", "seq")))
        seg_s = jax.device_put(seg, sharding.named_sharding(("batch", "seq")))

        @functools.partial(jax.jit, compiler_options=FAST)
        def fwd(state, ids, seg):
            return nnx.merge(graphdef, state)(ids, seg)

        out = fwd(sharded, ids_s, seg_s)
    assert _rel(out.logits, ref_logits) < 1e-5
    assert _rel(out.mtp_logits, ref_mtp) < 1e-5
    counts = sum(r.router["counts_E"] for r in refs)
    np.testing.assert_array_equal(out.router["counts_E"], counts)
