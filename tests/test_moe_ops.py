"""Routed-expert MoE op: backends vs a dense reference, capacity drops, expert parallelism, router
helpers, and the no-one-hot property of the backward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from moe_testing import small_pallas_tiles, split_value_and_grad  # noqa: F401 (autouse fixture)

from qwen3next_jax.ops import moe

T, D, F, E, K = 48, 32, 16, 8, 2
BACKENDS = ["ragged_dot", "padded", "dense", "pallas"]


def _params(seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (T, D), jnp.float32)
    wg = jax.random.normal(ks[1], (E, D, F), jnp.float32) / np.sqrt(D)
    wu = jax.random.normal(ks[2], (E, D, F), jnp.float32) / np.sqrt(D)
    wd = jax.random.normal(ks[3], (E, F, D), jnp.float32) / np.sqrt(F)
    cot = jax.random.normal(ks[4], (T, D), jnp.float32)
    return x.astype(dtype), wg.astype(dtype), wu.astype(dtype), wd.astype(dtype), cot


def _routing(kind, seed=1):
    """weights_TK (sum 1 per token) and idx_TK for 'random', 'balanced' or 'skewed' routing."""
    kw, kl = jax.random.split(jax.random.key(seed))
    w = jax.nn.softmax(jax.random.normal(kw, (T, K)), axis=-1)
    if kind == "random":
        _, idx, _ = moe.router_topk(jax.random.normal(kl, (T, E)), K)
    elif kind == "balanced":
        idx = (jnp.arange(T * K, dtype=jnp.int32) % E).reshape(T, K)
    else:  # every slot of every token to expert 3
        idx = jnp.full((T, K), 3, jnp.int32)
    return w, idx


def _reference(x, w, idx, wg, wu, wd, keep_TK=None):
    """Every expert on every token, combined through a dense [T, E] weight matrix (fp32)."""
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    w = w if keep_TK is None else w * keep_TK
    c_TE = jnp.zeros((x.shape[0], E)).at[jnp.arange(x.shape[0])[:, None], idx].add(w)
    hi = jax.lax.Precision.HIGHEST
    g = jnp.einsum("td,edf->etf", f32(x), f32(wg), precision=hi)
    u = jnp.einsum("td,edf->etf", f32(x), f32(wu), precision=hi)
    y_ETD = jnp.einsum("etf,efd->etd", jax.nn.silu(g) * u, f32(wd), precision=hi)
    return jnp.einsum("te,etd->td", c_TE, y_ETD, precision=hi)


def _numpy_reference(x, w, idx, wg, wu, wd):
    x, w, idx, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, w, idx, wg, wu, wd))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            g, u = x[t] @ wg[e], x[t] @ wu[e]
            out[t] += w[t, k] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
    return out


@functools.cache
def _op_fn(backend="auto", capacity_factor=None, mesh=None):
    """jit(value_and_grad) of sum(y * cot) for the op; idx is an argument, so every routing of
    the same shapes reuses one compilation. Returns ((loss, (y, stats)), grads of x, w, wg, wu, wd).
    With a mesh, the outputs and the gradients are two programs (see split_value_and_grad)."""

    def loss(x, w, idx, wg, wu, wd, cot):
        y, stats = moe.routed_experts(
            x, w, idx, wg, wu, wd, backend=backend, capacity_factor=capacity_factor, mesh=mesh
        )
        return jnp.sum(y.astype(jnp.float32) * cot), (y, stats)

    argnums = (0, 1, 3, 4, 5)
    if mesh is None:
        return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))
    return split_value_and_grad(loss, argnums)


@functools.cache
def _ref_fn():
    def loss(x, w, idx, wg, wu, wd, cot, keep_TK):
        y = _reference(x, w, idx, wg, wu, wd, keep_TK)
        return jnp.sum(y * cot), (y, None)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3, 4, 5), has_aux=True))


def _run_op(kind, seed=1, **op_kw):
    x, wg, wu, wd, cot = _params()
    w, idx = _routing(kind, seed)
    (_, (y, stats)), grads = _op_fn(**op_kw)(x, w, idx, wg, wu, wd, cot)
    return y, stats, grads


def _run_ref(kind, seed=1, keep_TK=None):
    x, wg, wu, wd, cot = _params()
    w, idx = _routing(kind, seed)
    keep_TK = jnp.ones((T, K)) if keep_TK is None else jnp.asarray(keep_TK)
    (_, (y, _)), grads = _ref_fn()(x, w, idx, wg, wu, wd, cot, keep_TK)
    return y, grads


def _assert_close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol)


def _assert_same(got, want, tol=1e-5):
    (y, grads), (y_ref, grads_ref) = got, want
    _assert_close(y, y_ref, tol)
    names = ("x", "weights", "w_gate", "w_up", "w_down")
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert np.abs(np.asarray(g_ref)).max() > 0, name
        _assert_close(g, g_ref, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_dense_reference(backend):
    for kind in ("random", "skewed"):
        y, _, grads = _run_op(kind, backend=backend)
        _assert_same((y, grads), _run_ref(kind))
    x, wg, wu, wd, _ = _params()
    w, idx = _routing("random")
    y, _, _ = _run_op("random", backend=backend)
    np.testing.assert_allclose(
        np.asarray(y), _numpy_reference(x, w, idx, wg, wu, wd), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend", ["ragged_dot", "pallas"])
def test_bf16_close_to_fp32_reference(backend):
    x, wg, wu, wd, _ = _params(dtype=jnp.bfloat16)
    w, idx = _routing("random")
    y, _ = jax.jit(lambda *a: moe.routed_experts(*a, backend=backend))(x, w, idx, wg, wu, wd)
    assert y.dtype == jnp.bfloat16
    _assert_close(y, _reference(x, w, idx, wg, wu, wd), 3e-2)


def _kept_slots(idx, capacity):
    """numpy: the first `capacity` slots of each expert in flat (token, slot) order are kept."""
    flat = np.asarray(idx).reshape(-1)
    keep = np.zeros(flat.shape, np.float32)
    seen = np.zeros(E, np.int64)
    for n, e in enumerate(flat):
        if seen[e] < capacity:
            keep[n] = 1.0
        seen[e] += 1
    return keep.reshape(idx.shape)


@pytest.mark.parametrize("backend", ["ragged_dot", "padded", "pallas", "dense"])
def test_capacity_drops_latest_slots(backend):
    cf = 1.0
    _, idx = _routing("random", seed=5)
    keep = _kept_slots(idx, int(np.ceil(cf * T * K / E)))
    assert 0 < keep.sum() < T * K  # the routing overflows some expert
    y, stats, grads = _run_op("random", seed=5, backend=backend, capacity_factor=cf)
    _assert_same((y, grads), _run_ref("random", seed=5, keep_TK=keep))
    assert float(stats["dropped_fraction"]) == pytest.approx(1 - keep.sum() / (T * K), abs=1e-7)
    counts = np.bincount(np.asarray(idx).reshape(-1), minlength=E)
    np.testing.assert_array_equal(stats["tokens_per_expert_E"], counts)


def test_dropless_stats():
    _, stats, _ = _run_op("skewed")
    assert float(stats["dropped_fraction"]) == 0.0
    assert stats["tokens_per_expert_E"].dtype == jnp.int32
    np.testing.assert_array_equal(stats["tokens_per_expert_E"], np.eye(E, dtype=int)[3] * T * K)


MESHES = [
    ((8,), ("expert",)),
    ((2, 4), ("data", "expert")),
    ((2, 2, 2), ("fsdp", "expert", "data")),
]


@pytest.mark.parametrize("mesh_shape,names", MESHES)
def test_expert_parallel_matches_single_device(mesh_shape, names):
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(AxisType.Explicit,) * len(names))
    for kind in ("balanced", "skewed"):
        y_ref, stats_ref, grads_ref = _run_op(kind)
        with jax.set_mesh(mesh):
            y, stats, grads = _run_op(kind, mesh=mesh)
        _assert_same((y, grads), (y_ref, grads_ref))
        np.testing.assert_array_equal(
            stats["tokens_per_expert_E"], stats_ref["tokens_per_expert_E"]
        )
        assert float(stats["dropped_fraction"]) == 0.0
        if mesh.shape["expert"] > 2:  # 2 shards have no fast path: its chunk is the worst case
            assert float(stats["ep_safe_path"]) == (1.0 if kind == "skewed" else 0.0)


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for j in param if isinstance(param, (tuple, list)) else (param,):
                j = getattr(j, "jaxpr", j)
                if hasattr(j, "eqns"):
                    yield from _eqns(j)


def test_expert_parallel_sends_each_token_once_per_shard():
    # Traffic is per (token, destination shard), not per routed slot: every activation buffer
    # that crosses devices, forward and backward, has at most (shards x local tokens) rows.
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(AxisType.Auto,))
    x, wg, wu, wd, cot = _params()
    w, idx = _routing("random")
    f = lambda *a: jnp.sum(moe.routed_experts(*a, mesh=mesh)[0] * cot)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 3)))(x, w, idx, wg, wu, wd).jaxpr
    rows = [
        v.aval.shape[0]
        for eqn in _eqns(jaxpr)
        if eqn.primitive.name == "all_to_all"
        for v in eqn.invars
        if v.aval.ndim == 2 and v.aval.shape[1] == D
    ]
    assert len(rows) >= 3  # x out, y back, and the backward's exchanges
    assert max(rows) <= 8 * (T // 8) < 8 * (T // 8) * K


@pytest.mark.slow
def test_expert_parallel_capacity_matches_single_device():
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(AxisType.Auto,))
    y_ref, st_ref, grads_ref = _run_op("random", seed=5, capacity_factor=1.0)
    y, st, grads = _run_op("random", seed=5, capacity_factor=1.0, mesh=mesh)
    assert float(st_ref["dropped_fraction"]) > 0
    _assert_same((y, grads), (y_ref, grads_ref))
    assert float(st["dropped_fraction"]) == pytest.approx(float(st_ref["dropped_fraction"]))


@pytest.mark.slow
def test_expert_parallel_pallas_backend():
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
    y_ref, _, grads_ref = _run_op("random")
    y, _, grads = _run_op("random", backend="pallas", mesh=mesh)
    _assert_same((y, grads), (y_ref, grads_ref))


def test_router_topk_matches_numpy():
    logits = jax.random.normal(jax.random.key(3), (T, E), jnp.bfloat16)
    for norm in (True, False):
        w, idx, probs = moe.router_topk(logits, K, norm_topk_prob=norm)
        z = np.asarray(logits, np.float64)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1, kind="stable")[:, :K]
        pw = np.take_along_axis(p, top, -1)
        if norm:
            pw = pw / pw.sum(-1, keepdims=True)
        assert w.dtype == jnp.float32 and probs.dtype == jnp.float32 and idx.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(idx), top)
        np.testing.assert_allclose(np.asarray(w), pw, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-5)


def test_load_balancing_terms():
    # Uniform: every expert gets the same share of slots and of probability mass.
    probs = jnp.full((T, E), 1.0 / E)
    _, idx = _routing("balanced")
    f, p = moe.load_balancing_terms(probs, idx, E)
    assert float(E * jnp.sum(f * p)) == pytest.approx(1.0, rel=1e-6)

    _, idx, probs = moe.router_topk(jax.random.normal(jax.random.key(4), (T, E)), K)
    mask = np.arange(T) % 3 != 0
    f, p = moe.load_balancing_terms(probs, idx, E, mask_T=jnp.asarray(mask))
    idx_np, probs_np = np.asarray(idx)[mask], np.asarray(probs)[mask]
    f_np = np.bincount(idx_np.reshape(-1), minlength=E) / (K * mask.sum())
    np.testing.assert_allclose(np.asarray(f), f_np, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p), probs_np.mean(0), rtol=1e-5)
    assert float(jnp.sum(f)) == pytest.approx(1.0)


def _eqns(jaxpr, into_pallas=True):
    """Every equation, recursing into sub-jaxprs (pjit, custom_vjp, cond, ...; a Pallas kernel's
    body only with into_pallas)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call" and not into_pallas:
            continue
        for param in eqn.params.values():
            for j in param if isinstance(param, (tuple, list)) else (param,):
                j = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
                if hasattr(j, "eqns"):
                    yield from _eqns(j, into_pallas)


def _all_shapes(jaxpr):
    """Output shapes of every equation, sub-jaxprs included."""
    for eqn in _eqns(jaxpr):
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))


def _one_hot_like_shapes(backend):
    """2-D arrays pairing a token/slot axis with the expert axis in the jaxpr of the gradient."""
    x, wg, wu, wd, cot = _params()
    w, idx = _routing("random")

    def loss(x, w, g, u, d):
        return jnp.sum(moe.routed_experts(x, w, idx, g, u, d, backend=backend)[0] * cot)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(x, w, wg, wu, wd).jaxpr
    shapes = list(_all_shapes(jaxpr))
    assert len(shapes) > 20
    return [s for s in shapes if len(s) == 2 and E in s and ({T, T * K} & set(s))]


@pytest.mark.parametrize("backend", ["ragged_dot", "padded", "pallas"])
def test_backward_has_no_one_hot(backend):
    assert not _one_hot_like_shapes(backend)


def test_one_hot_detector_flags_dense_backend():
    # The dense reference masks every expert over every row: the detector must see it.
    assert _one_hot_like_shapes("dense")


def test_unknown_backend_and_missing_tokamax():
    x, wg, wu, wd, _ = _params()
    w, idx = _routing("random")
    with pytest.raises(ValueError, match="unknown MoE backend"):
        moe.routed_experts(x, w, idx, wg, wu, wd, backend="cuda")
    try:
        import tokamax  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tokamax"):
            moe.routed_experts(x, w, idx, wg, wu, wd, backend="tokamax")


def test_group_starts_match_searchsorted():
    """Sorted ids with empty groups (first, middle, last) and the invalid id G."""
    from qwen3next_jax.ops.moe_dispatch import group_starts, sort_by_group

    rng = np.random.default_rng(3)
    for ids in (
        np.array([1, 1, 3, 3, 3, 6, 8, 8], np.int32),  # G = 8: 0, 2, 4, 5, 7 empty; invalid 8
        rng.integers(0, 9, 200).astype(np.int32),
        np.full(5, 8, np.int32),  # every entry invalid
        np.arange(8, dtype=np.int32),
    ):
        g = 8
        want = np.searchsorted(np.sort(ids), np.arange(g + 1), side="left")
        np.testing.assert_array_equal(group_starts(jnp.asarray(np.sort(ids)), g), want)
        order, gid_sorted, bounds = sort_by_group(jnp.asarray(ids), g)
        np.testing.assert_array_equal(bounds, want)
        np.testing.assert_array_equal(gid_sorted, np.sort(ids))
        np.testing.assert_array_equal(order, np.argsort(ids, kind="stable"))


@pytest.mark.parametrize("backend", ["pallas", "pallas_fused"])
def test_routed_experts_program_has_no_while_loop(backend):
    """On a GPU every XLA while loop runs one launch per iteration outside the step's command
    buffer; the dispatch and tile maps of the Pallas backends must not contain one."""
    x, wg, wu, wd, cot = _params()
    w, idx = _routing("random")

    def loss(x, w, wg, wu, wd):
        y, _ = moe.routed_experts(x, w, idx, wg, wu, wd, backend=backend)
        return jnp.sum(y * cot)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(x, w, wg, wu, wd).jaxpr
    names = [eqn.primitive.name for eqn in _eqns(jaxpr, into_pallas=False)]
    assert "pallas_call" in names
    assert not {"while", "scan"} & set(names)  # XLA-level loops (a kernel's own are fine)
