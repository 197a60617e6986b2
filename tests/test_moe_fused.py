"""The fused-gather Pallas MoE path (backend "pallas_fused"): outputs and all five gradients against
a dense per-expert reference, skewed and uniform routing, fp32 and bf16, capacity drops, expert
parallelism; which [rows, D] buffers it leaves out; and that its kernels lower to Triton IR."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from moe_testing import small_pallas_tiles, split_value_and_grad  # noqa: F401 (autouse fixture)

from qwen3next_jax.ops import moe, moe_experts, moe_mosaic, moe_pallas

T, D, F, E, K = 40, 64, 32, 8, 3


def _inputs(dtype, kind, seed=0):
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (T, D), jnp.float32)
    wg = jax.random.normal(ks[1], (E, D, F), jnp.float32) / np.sqrt(D)
    wu = jax.random.normal(ks[2], (E, D, F), jnp.float32) / np.sqrt(D)
    wd = jax.random.normal(ks[3], (E, F, D), jnp.float32) / np.sqrt(F)
    cot = jax.random.normal(ks[4], (T, D), jnp.float32)
    w = jax.nn.softmax(jax.random.normal(ks[5], (T, K)), axis=-1)
    if kind == "random":
        _, idx, _ = moe.router_topk(jax.random.normal(ks[6], (T, E)), K)
    elif kind == "uniform":  # every expert gets T*K/E slots, distinct experts per token
        idx = (jnp.arange(T * K, dtype=jnp.int32) % E).reshape(T, K)
    else:  # skewed: every slot of every token to expert 5
        idx = jnp.full((T, K), 5, jnp.int32)
    cast = lambda a: a.astype(dtype)  # noqa: E731
    return cast(x), w, idx, cast(wg), cast(wu), cast(wd), cot


def _reference(x, w, idx, wg, wu, wd):
    """Dense per-expert reference in fp32: every expert on every token, combined through a dense
    [T, E] weight matrix."""
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    c_TE = jnp.zeros((x.shape[0], E)).at[jnp.arange(x.shape[0])[:, None], idx].add(w)
    hi = jax.lax.Precision.HIGHEST
    g = jnp.einsum("td,edf->etf", f32(x), f32(wg), precision=hi)
    u = jnp.einsum("td,edf->etf", f32(x), f32(wu), precision=hi)
    y_ETD = jnp.einsum("etf,efd->etd", jax.nn.silu(g) * u, f32(wd), precision=hi)
    return jnp.einsum("te,etd->td", c_TE, y_ETD, precision=hi)


@functools.cache
def _grad_fn(backend, capacity_factor=None, mesh=None, tune=None):
    """jit(value_and_grad) of sum(y * cot) -> (y, (dx, dw, dWg, dWu, dWd)). `tune` only keys the
    cache: a test that patches moe_pallas.TUNE passes it so that its program is traced anew."""
    del tune

    def loss(x, w, idx, wg, wu, wd, cot):
        if backend == "reference":
            y = _reference(x, w, idx, wg, wu, wd)
        else:
            y, _ = moe.routed_experts(
                x, w, idx, wg, wu, wd, backend=backend, capacity_factor=capacity_factor, mesh=mesh
            )
        return jnp.sum(y.astype(jnp.float32) * cot), y

    argnums = (0, 1, 3, 4, 5)
    if mesh is None:
        return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))
    return split_value_and_grad(loss, argnums)


def _run(backend, args, **kw):
    (_, y), grads = _grad_fn(backend, **kw)(*args)
    return [y, *grads]


def _assert_close(got, want, tol):
    names = ("y", "dx", "dweights", "dW_gate", "dW_up", "dW_down")
    for name, a, b in zip(names, got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(1e-6, float(np.abs(b).max()))
        err = float(np.abs(a - b).max()) / scale
        assert err < tol, f"{name}: max abs error / max abs value = {err:.2e} >= {tol}"


@pytest.mark.parametrize("kind", ["skewed", "uniform", "random"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_matches_dense_reference(kind, dtype):
    dt = jnp.dtype(dtype)
    args = _inputs(dt, kind)
    # The reference sees the same (rounded) inputs, in fp32.
    ref = _run("reference", tuple(a.astype(jnp.float32) if a.dtype == dt else a for a in args))
    got = _run("pallas_fused", args)
    assert got[0].dtype == dt and got[1].dtype == dt and got[2].dtype == jnp.float32
    # bf16: h, g, u and the per-row products are rounded to bf16 (as in the unfused path).
    _assert_close(got, ref, 1e-5 if dt == jnp.float32 else 1.5e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_matches_unfused_pallas(dtype, monkeypatch):
    """Same kernels, same layout: the fused and the materialised paths agree closely (bf16 rounds
    w * h instead of y, hence not bitwise). The float32 case runs the fused down backward as one
    kernel (DOWN_BWD_SPLIT off) with narrower column blocks than the other kernels (more dL/dw
    partials to sum), the bfloat16 case dW_gate and dW_up in one paired kernel."""
    dt = jnp.dtype(dtype)
    if dt == jnp.float32:
        tune = "down_bwd one kernel, narrow"
        monkeypatch.setattr(moe_pallas, "DOWN_BWD_SPLIT", False)
        monkeypatch.setattr(moe_pallas, "TUNE", {"down_bwd": {"bn": moe_pallas.BLOCK_N // 2}})
    else:
        tune = "paired dW_gate, dW_up"
        monkeypatch.setattr(moe_pallas, "TGMM_PAIR", True)
    args = _inputs(dt, "random", seed=3)
    _assert_close(
        _run("pallas_fused", args, tune=tune),
        _run("pallas", args, tune=tune),
        1e-5 if dt == jnp.float32 else 2e-2,
    )


@pytest.mark.parametrize("variant", ["split down backward", "row sub-blocks, oblong dW tiles"])
def test_fused_launch_variants_match_reference(variant, monkeypatch):
    """Launch options that change what each program computes: the down backward's epilogue as
    its own row-wise kernel (DOWN_BWD_SPLIT), row blocks of half a tile in every row kernel and dW tiles with unequal
    sides (TUNE "bm", "ba", "bb")."""
    if variant == "split down backward":
        monkeypatch.setattr(moe_pallas, "DOWN_BWD_SPLIT", True)
    else:
        half = {"bm": moe_pallas.TILE_M // 2}
        tune = {k: dict(half) for k in ("gateup", "down", "down_bwd", "dx")}
        tune["tgmm"] = {"ba": moe_pallas.BLOCK_N * 2, "bb": moe_pallas.BLOCK_N}
        monkeypatch.setattr(moe_pallas, "TUNE", tune)
    args = _inputs(jnp.float32, "random", seed=4)
    _assert_close(_run("pallas_fused", args, tune=variant), _run("reference", args), 1e-5)


def test_fused_capacity_drops_match_unfused():
    # cf 0.5: experts keep half the balanced load, so many slots are dropped (zero output and
    # zero weight gradient); the drop rule itself is tested against the reference elsewhere.
    args = _inputs(jnp.float32, "random", seed=5)
    got = _run("pallas_fused", args, capacity_factor=0.5)
    want = _run("pallas", args, capacity_factor=0.5)
    _assert_close(got, want, 1e-5)
    assert float(np.abs(np.asarray(got[2])).min()) == 0.0  # some slot weights got no gradient


@pytest.mark.parametrize("kind", ["skewed", "uniform"])
@pytest.mark.parametrize(
    ("mesh_shape", "names"), [((8,), ("expert",)), ((2, 4), ("data", "expert"))]
)
def test_fused_expert_parallel_matches_reference(kind, mesh_shape, names):
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(AxisType.Explicit,) * len(names))
    args = _inputs(jnp.float32, kind, seed=2)
    got = _run("pallas_fused", args, mesh=mesh)
    _assert_close(got, _run("reference", args), 1e-5)


def test_fused_on_a_one_device_explicit_mesh_matches_reference():
    """A mesh whose axes are all of size 1 (bench/moe.py --ep on one GPU) runs the local path:
    its explicitly typed (size-1) shardings must not reach the token sort."""
    mesh = jax.make_mesh(
        (1,), ("expert",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:1]
    )
    args = _inputs(jnp.float32, "random", seed=2)
    with jax.set_mesh(mesh):
        shard = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
        got = _run("pallas_fused", tuple(shard(a, P("expert")) for a in args), mesh=mesh)
    _assert_close(got, _run("reference", args), 1e-5)


@pytest.mark.parametrize(
    ("dtype", "which"),
    [("float32", ("gate_up", "down")), ("bfloat16", ("gate_up", "down"))]
    + [("float32", ("gate_up",)), ("float32", ("down",))],
)
def test_fused_sorted_weight_grads_match_reference(dtype, which, monkeypatch):
    """The backward that Hopper runs (_sorted_wgrad): the gate-up and down-backward kernels also
    write the gathered x and cotangent rows, and the weight gradients are products over sorted
    rows (moe_mosaic.grouped_weight_grad, here its plain-JAX reference: the kernel is Hopper
    only); SORTED_WGRAD picks which. Padding and half-tile rows must add nothing."""
    monkeypatch.setattr(moe_pallas, "_sorted_wgrad", lambda *a: True)
    monkeypatch.setattr(moe_pallas, "SORTED_WGRAD", which)
    monkeypatch.setattr(moe_mosaic, "grouped_weight_grad", moe_mosaic.weight_grad_reference)
    dt = jnp.dtype(dtype)
    args = _inputs(dt, "random", seed=6)
    ref = _run("reference", tuple(a.astype(jnp.float32) if a.dtype == dt else a for a in args))
    got = _run("pallas_fused", args, tune=f"sorted {which}")
    _assert_close(got, ref, 1e-5 if dt == jnp.float32 else 1.5e-2)


def _rd_buffers(backend):
    """Distinct [R, D]-shaped arrays in the jaxpr of the op's gradient (R = the pallas rows)."""
    x, w, idx, wg, wu, wd, cot = _inputs(jnp.float32, "random")
    rows, _ = moe_experts.row_layout("pallas", T * K, E, None)

    def loss(x, w, g, u, d):
        y = moe.routed_experts(x, w, idx, g, u, d, backend=backend)[0]
        return jnp.sum(y * cot)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(x, w, wg, wu, wd).jaxpr

    def walk(j):
        for eqn in j.eqns:
            for v in eqn.outvars:
                if tuple(getattr(v.aval, "shape", ())) == (rows, D):
                    yield v
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from walk(sub)

    return len(set(map(id, walk(jaxpr))))


def test_fused_leaves_out_sorted_copies():
    # Fused: only the down kernel's output rows and the dx kernel's rows ([R, D], summed per
    # token by a K-row gather). Unfused adds the sorted x copy and the combine backward's rows.
    fused, unfused = _rd_buffers("pallas_fused"), _rd_buffers("pallas")
    assert fused == 2, fused
    assert unfused > fused


def test_fused_kernels_lower_to_triton(monkeypatch):
    """Interpret mode proves the maths, not that Triton accepts the row-gather indexers: lower
    the whole gradient for CUDA (no GPU needed with jax.export) and count the Triton kernels."""
    monkeypatch.setattr(moe_pallas, "_interpret", lambda: False)
    monkeypatch.setattr(moe_pallas, "TILE_M", 128)
    monkeypatch.setattr(moe_pallas, "BLOCK_N", 128)
    monkeypatch.setattr(moe_pallas, "BLOCK_K", 64)
    monkeypatch.setattr(moe_pallas, "TGMM_ROWS", 64)
    monkeypatch.setattr(moe_pallas, "TGMM_ROWS_PAIR", 128)
    t, d, f, e, k = 256, 256, 128, 4, 2
    sd = jax.ShapeDtypeStruct
    bf = jnp.bfloat16

    def loss(x, w, idx, wg, wu, wd):
        y = moe.routed_experts(x, w, idx, wg, wu, wd, backend="pallas_fused")[0]
        return jnp.sum(y.astype(jnp.float32))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3, 4, 5)))
    export_kw = dict(
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )
    args = (
        sd((t, d), bf),
        sd((t, k), jnp.float32),
        sd((t, k), jnp.int32),
        sd((e, d, f), bf),
        sd((e, d, f), bf),
        sd((e, f, d), bf),
    )
    text = jax.export.export(fn, **export_kw)(*args).mlir_module()
    names = ("_gateup_gather_kernel", "_down_kernel", "_dwh_gather_kernel", "_swiglu_bwd_kernel")
    for name in (*names, "_dx_kernel"):
        assert f'name = "{name}"' in text, name
    assert text.count('name = "_tgmm_kernel"') == 3  # dW_gate, dW_up, dW_down (TGMM_PAIR off)
    assert text.count('name = "_sum_rows_kernel"') == 2  # the combine and dx's K-row sum
    # The down backward as one kernel (DOWN_BWD_SPLIT off) lowers too.
    monkeypatch.setattr(moe_pallas, "DOWN_BWD_SPLIT", False)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3, 4, 5)))  # a new trace
    text = jax.export.export(fn, **export_kw)(*args).mlir_module()
    assert 'name = "_down_bwd_gather_kernel"' in text
    assert 'name = "_dwh_gather_kernel"' not in text
    # Hopper's backward (_sorted_wgrad) with every weight gradient on sorted rows: both
    # gathering kernels with their row-copy programs, the weight gradients as Mosaic GPU kernels
    monkeypatch.setattr(moe_pallas, "DOWN_BWD_SPLIT", True)
    monkeypatch.setattr(moe_pallas, "_sorted_wgrad", lambda *a: True)
    monkeypatch.setattr(moe_pallas, "SORTED_WGRAD", ("gate_up", "down"))
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3, 4, 5)))
    export_kw["disabled_checks"].append(jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2"))
    text = jax.export.export(fn, **export_kw)(*args).mlir_module()
    assert 'name = "_tgmm_kernel"' not in text
    assert text.count("mosaic_gpu_v2") >= 2  # dW_gate with dW_up, dW_down


def test_sum_rows_kernel_matches_gather_sum():
    """The K-row sum kernel against moe_dispatch.sum_slot_rows: absent slots (pos == R) add 0,
    T not a multiple of the kernel's token block, bf16 rows summed in fp32."""
    from qwen3next_jax.ops import moe_dispatch

    r, t, k = 50, 37, 3
    y = jax.random.normal(jax.random.key(3), (r, D), jnp.float32).astype(jnp.bfloat16)
    pos = jax.random.randint(jax.random.key(4), (t, k), 0, r + 1).at[0].set(r)
    got = moe_pallas.sum_rows(y, pos, jnp.float32)
    want = moe_dispatch.sum_slot_rows(y, pos)
    assert got.shape == (t, D) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(got[0]) == 0.0)


@pytest.mark.parametrize("norm", [True, False])
def test_pallas_router_matches_xla(norm):
    """Fused softmax + top-k + renormalisation: same weights, ids, probabilities and logits
    gradient (through weights and probs) as the XLA router; T not a multiple of its row block."""
    t, e, k = 70, 16, 5
    ks = jax.random.split(jax.random.key(9), 3)
    logits = 3.0 * jax.random.normal(ks[0], (t, e))
    logits = logits.at[0, :].set(0.5)  # a row of ties: lowest ids win, as in lax.top_k
    c_w = jax.random.normal(ks[1], (t, k))
    c_p = jax.random.normal(ks[2], (t, e))

    def run(impl):
        def f(z):
            w, idx, p = moe.router_topk(z, k, norm, impl=impl)
            return jnp.sum(w * c_w) + jnp.sum(p * c_p), (w, idx, p)

        (_, (w, idx, p)), dz = jax.jit(jax.value_and_grad(f, has_aux=True))(logits)
        return w, idx, p, dz

    w, idx, p, dz = run("pallas")
    w_ref, idx_ref, p_ref, dz_ref = run("xla")
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_array_equal(idx[0], np.arange(k))
    np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p, p_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dz, dz_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_probs", [True, False])
def test_pallas_router_lowers_to_triton(monkeypatch, use_probs):
    """Forward and backward kernels lower to Triton IR at the model's shape (E 512, k 10: index
    tiles padded to 16 columns); no XLA scatter is left in the gradient."""
    monkeypatch.setattr(moe_pallas, "_interpret", lambda: False)

    def f(z):
        w, _, p = moe.router_topk(z, 10, impl="pallas")
        return jnp.sum(w) + (jnp.sum(p * p) if use_probs else 0.0)

    exported = jax.export.export(
        jax.jit(jax.value_and_grad(f)),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(jax.ShapeDtypeStruct((256, 512), jnp.float32))
    text = exported.mlir_module()
    assert text.count('name = "_router_kernel"') == 1
    assert text.count('name = "_router_bwd_kernel"') == 1
    assert "scatter" not in text


def test_pallas_router_lowers_under_an_ambient_mesh(monkeypatch):
    """Under jax.set_mesh with an Explicit token axis and no mesh argument, the router kernels
    still lower for GPU: router_topk takes the ambient mesh and runs them in shard_map (a bare
    pallas_call there fails: all mesh axes must be Manual)."""
    monkeypatch.setattr(moe_pallas, "_interpret", lambda: False)
    mesh = jax.make_mesh(
        (2,), ("expert",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2]
    )

    def f(z):
        return jnp.sum(moe.router_topk(z, 10, impl="pallas")[0])

    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("expert", None))
        exported = jax.export.export(
            jax.jit(jax.value_and_grad(f)),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=spec))
    assert exported.mlir_module().count('name = "_router_kernel"') == 1


def _router_grad(impl, norm, loss, k, bwd=None):
    """jit(value_and_grad) of a loss through the router's weights and/or probs, with fixed random
    cotangents: (w, idx, probs, dlogits)."""

    def f(z, c_w, c_p):
        if impl == "xla":
            w, idx, p = moe.router_topk(z, k, norm, impl="xla")
        else:
            w, idx, p = moe_pallas.router_topk(z, k, norm, bwd=bwd)
        total = 0.0
        if loss in ("both", "weights"):
            total = total + jnp.sum(w * c_w)
        if loss in ("both", "probs"):  # the load-balancing loss's path
            total = total + jnp.sum(p * c_p)
        return total, (w, idx, p)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


def _max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
    ("k", "loss", "bwd"),
    [
        (5, "both", "pallas"),
        (5, "weights", "pallas"),  # probs cotangent a symbolic zero: the kernel skips it
        (5, "probs", "pallas"),  # weights cotangent a symbolic zero
        (4, "both", "pallas"),  # k a power of two: no padded index columns
        (5, "both", "xla"),  # the XLA backward behind the Pallas forward (bench variant)
    ],
)
@pytest.mark.parametrize("norm", [True, False])
def test_pallas_router_backward_matches_xla(norm, k, loss, bwd):
    """dlogits of the fused router (Pallas backward: renormalisation, top-k and softmax
    transposes in one kernel) equal the XLA router's to fp32 rounding; T = 70 is not a multiple
    of ROUTER_ROWS, so padded rows exist too."""
    t, e = 70, 32
    ks = jax.random.split(jax.random.key(11), 3)
    args = (
        3.0 * jax.random.normal(ks[0], (t, e)),
        jax.random.normal(ks[1], (t, k)),
        jax.random.normal(ks[2], (t, e)),
    )
    (_, (w, idx, p)), dz = _router_grad("pallas", norm, loss, k, bwd)(*args)
    (_, (w_ref, idx_ref, p_ref)), dz_ref = _router_grad("xla", norm, loss, k)(*args)
    np.testing.assert_array_equal(idx, idx_ref)
    assert _max_rel(w, w_ref) < 1e-6 and _max_rel(p, p_ref) < 1e-6
    assert dz.shape == (t, e) and dz.dtype == jnp.float32
    assert _max_rel(dz, dz_ref) < 1e-6, _max_rel(dz, dz_ref)


def test_router_impl_auto_picks_pallas_on_gpu(monkeypatch):
    """'auto' is the XLA router on CPU; when tracing for GPU, the Pallas kernels if E is a power
    of two (else XLA)."""

    def kernels(e):
        jaxpr = jax.make_jaxpr(lambda z: moe.router_topk(z, 2, impl="auto"))(jnp.zeros((8, e)))
        return str(jaxpr).count("pallas_call")

    assert kernels(8) == 0
    monkeypatch.setattr(moe.sharding, "target_platform", lambda: "gpu")
    assert kernels(8) == 1
    assert kernels(12) == 0


def _moe_layer_run(router_impl, mesh=None):
    """A tiny-config SparseMoE (E 8, k 2, shared expert) on fixed parameters: outputs, stats and
    the gradient of sum(y * c) + the load-balancing-style sum over prob_sum_E (so the probs'
    cotangent is real) w.r.t. the router weights and x."""
    from flax import nnx

    from qwen3next_jax import sharding
    from qwen3next_jax.config import tiny
    from qwen3next_jax.layers.moe import SparseMoE

    cfg = tiny(router_impl=router_impl)
    layer = SparseMoE(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    ks = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(ks[0], (8, 10, cfg.hidden_size))
    c = jax.random.normal(ks[1], (8, 10, cfg.hidden_size))
    c_E = jax.random.normal(ks[2], (cfg.num_experts,))

    def loss(state, x):
        y, stats = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * c) + jnp.sum(stats["prob_sum_E"] * c_E), (y, stats)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        (_, (y, stats)), (g_state, dx) = fn(state, x)
    else:
        with sharding.use_mesh(mesh):
            x = jax.device_put(x, sharding.named_sharding(("batch", "seq")))
            (_, (y, stats)), (g_state, dx) = fn(state, x)
    return y, stats, g_state["router_DE"][...], dx


@pytest.mark.parametrize("sharded", [False, True])
def test_moe_layer_pallas_router_matches_xla(sharded):
    """router_impl='pallas' (interpret mode here) gives the layer the same outputs, routing stats
    and gradients as 'xla'; sharded: tokens over data x fsdp x expert (the router in shard_map)."""
    from qwen3next_jax import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2}) if sharded else None
    y, stats, g_router, dx = _moe_layer_run("pallas", mesh)
    y_ref, stats_ref, g_router_ref, dx_ref = _moe_layer_run("xla")
    np.testing.assert_array_equal(stats["counts_E"], stats_ref["counts_E"])
    for key in ("prob_sum_E", "num_tokens", "z_sum", "entropy_sum", "dropped_fraction"):
        np.testing.assert_allclose(stats[key], stats_ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert _max_rel(y, y_ref) < 1e-5
    assert _max_rel(g_router, g_router_ref) < 1e-5
    assert _max_rel(dx, dx_ref) < 1e-5


def test_router_impl_config_validation():
    from qwen3next_jax.config import ConfigError, tiny

    assert tiny().router_impl == "auto"
    with pytest.raises(ConfigError, match="router_impl='triton'"):
        tiny(router_impl="triton")


def test_half_tiles_flag_short_last_tiles():
    """_half_tiles marks a group's last tile when it holds at most TILE_M / 2 used rows (TILE_M
    16 here: groups of 3, 20, 8, 9 and 0 rows)."""
    sizes = jnp.asarray([3, 20, 8, 9, 0], jnp.int32)
    padded = -(-sizes // 16) * 16
    start = jnp.cumsum(padded) - padded
    tg, _, r1 = moe_pallas._tile_maps(sizes, start, 7 * 16)
    assert tg.tolist() == [0, 1, 1, 2, 3, -1, -1]
    assert moe_pallas._half_tiles(tg, r1).tolist() == [1, 0, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("kind", ["random", "skewed"])
def test_half_tiles_change_nothing(kind, monkeypatch):
    """The half-tile path (first TILE_M / 2 rows computed, the rest zero) gives the output and
    gradients of full tiles (fp32, interpret mode); both routings end a group in a half tile."""
    args = _inputs(jnp.float32, kind, seed=3)
    last = np.bincount(np.asarray(args[2]).ravel(), minlength=E) % moe_pallas.TILE_M
    assert np.any((last > 0) & (last <= moe_pallas.TILE_M // 2))
    got = _run("pallas_fused", args, tune="half")
    monkeypatch.setattr(moe_pallas, "HALF_TILES", False)
    want = _run("pallas_fused", args, tune="full")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
