"""TPU kernel backends against the references: splash attention vs XLA attention, megablox
grouped SwiGLU vs the dense backend (both in Pallas interpret mode on CPU, with and without a
mesh), and an ahead-of-time TPU compile of the real kernels for abstract v5p devices."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen3next_jax import sharding
from qwen3next_jax.config import ModelConfig
from qwen3next_jax.ops import attention, attention_splash, moe


def _qkv(B, T, N, K, H, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32)
    cot = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)
    return q, k, v, cot


def _packed_segments(B, T):
    """Row 0: three documents then padding; row 1: padding first, then two documents. Document
    boundaries fall inside 128-blocks so the kernel's partial blocks are exercised."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :70], seg[0, 70:150], seg[0, 150:230] = 1, 2, 3
    seg[1, 20:200], seg[1, 200:] = 4, 5
    return jnp.asarray(seg)


def _value_and_grads(fn, q, k, v, cot):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v) * cot)

    out = jax.jit(fn)(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _assert_close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def test_splash_matches_xla_with_packed_segments_and_gqa():
    B, T, N, K, H = 2, 256, 4, 2, 256
    q, k, v, cot = _qkv(B, T, N, K, H)
    seg = _packed_segments(B, T)

    def run(backend):
        fn = lambda q, k, v: attention.causal_attention(  # noqa: E731
            q, k, v, segment_ids_BT=seg, backend=backend
        )
        return _value_and_grads(fn, q, k, v, cot)

    out, grads = run("splash_interpret")
    ref_out, ref_grads = run("xla")
    assert out.dtype == q.dtype and out.shape == (B, T, N, H)
    assert bool(jnp.all(jnp.isfinite(out)))
    _assert_close(out, ref_out, 2e-5)
    _assert_close(grads, ref_grads, 2e-5)


@pytest.mark.parametrize(
    "mesh_shape,N,K",
    [
        ({"data": 2, "tensor": 2}, 4, 2),  # batch split; each head shard slices its kv head
        ({"tensor": 2}, 6, 3),  # kv groups straddle the head shards: per-head kv gather
    ],
)
def test_splash_under_a_mesh_matches_xla(mesh_shape, N, K):
    B, T, H = 2, 256, 128
    q, k, v, cot = _qkv(B, T, N, K, H, seed=1)
    seg = _packed_segments(B, T)
    mesh = sharding.make_mesh(
        mesh_shape, devices=jax.devices()[: int(np.prod([*mesh_shape.values()]))]
    )

    def splash(q, k, v):  # 128-blocks: a 2x2 block grid with a skipped block
        return attention_splash.splash_attention(
            q, k, v, segment_ids_BT=seg, interpret=True, max_block=128
        )

    def xla(q, k, v):
        return attention.causal_attention(q, k, v, segment_ids_BT=seg, backend="xla")

    with sharding.use_mesh(mesh):
        assert attention.resolve_backend("auto") == "xla"  # a CPU mesh
        out, grads = _value_and_grads(splash, q, k, v, cot)
        hlo = jax.jit(splash).lower(q, k, v).as_text()
    assert "sdy.manual_computation" in hlo  # the kernel runs inside shard_map
    ref_out, ref_grads = _value_and_grads(xla, q, k, v, cot)
    _assert_close(out, ref_out, 2e-5)
    _assert_close(grads, ref_grads, 2e-5)


def test_splash_shape_errors_and_auto_fallback():
    q, k, v, _ = _qkv(1, 100, 2, 1, 128)
    with pytest.raises(ValueError, match="multiple of 128; got 100"):
        attention.causal_attention(q, k, v, backend="splash")
    assert not attention_splash.supports(q, k)
    q, k, _, _ = _qkv(1, 128, 2, 1, 128)
    assert attention_splash.supports(q, k)
    with sharding.use_mesh(sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])):
        assert not attention_splash.supports(q, k)  # one row cannot split over two shards
    assert attention_splash.block_size(1024) == 512 and attention_splash.block_size(384) == 128
    with pytest.raises(ValueError, match="unknown"):
        attention.resolve_backend("flash")
    cfg = ModelConfig(attention_backend="splash", moe_backend="megablox")
    assert cfg.attention_backend == "splash" and cfg.moe_backend == "megablox"
    with pytest.raises(ValueError, match="moe_backend='gmm' must be one of"):
        ModelConfig(moe_backend="gmm")


def test_auto_on_tpu_falls_back_to_xla_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(sharding, "target_platform", lambda: "tpu")
    assert attention.resolve_backend("auto") == "splash"
    q, k, v, _ = _qkv(1, 100, 2, 1, 128)  # T = 100: splash needs multiples of 128
    ref = attention.causal_attention(q, k, v, backend="xla")
    with caplog.at_level("WARNING"):
        for _ in range(2):
            out = attention.causal_attention(q, k, v, backend="auto")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    warned = [r for r in caplog.records if "using XLA attention" in r.getMessage()]
    assert len(warned) == 1 and "(1, 100, 2, 128)" in warned[0].getMessage()


# --------------------------------------------------------------------------------- megablox

T_TOK, D, F, E, TOPK = 64, 128, 64, 4, 2


def _moe_inputs(routing, seed=0):
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (T_TOK, D), jnp.float32)
    w = jax.nn.softmax(jax.random.normal(ks[1], (T_TOK, TOPK)), axis=-1)
    wg = jax.random.normal(ks[2], (E, D, F), jnp.float32) / np.sqrt(D)
    wu = jax.random.normal(ks[3], (E, D, F), jnp.float32) / np.sqrt(D)
    wd = jax.random.normal(ks[4], (E, F, D), jnp.float32) / np.sqrt(F)
    cot = jax.random.normal(ks[5], (T_TOK, D), jnp.float32)
    if routing == "skewed":  # every slot to expert 2: three empty groups around a full one
        idx = jnp.full((T_TOK, TOPK), 2, jnp.int32)
    else:
        _, idx, _ = moe.router_topk(jax.random.normal(ks[6], (T_TOK, E)), TOPK)
    return x, w, idx, wg, wu, wd, cot


def _moe_value_and_grads(backend, inputs, mesh=None):
    x, w, idx, wg, wu, wd, cot = inputs

    def y(x, w, wg, wu, wd):
        return moe.routed_experts(x, w, idx, wg, wu, wd, backend=backend, mesh=mesh)[0]

    def loss(*a):
        return jnp.sum(y(*a) * cot)

    args = (x, w, wg, wu, wd)
    return jax.jit(y)(*args), jax.jit(jax.grad(loss, argnums=range(5)))(*args)


@pytest.mark.parametrize(
    "routing,mesh_shape",
    # skewed: three empty groups around a full one; expert=2: inside the expert-parallel
    # shard_map of routed_experts, each shard's megablox sees its two local experts.
    [("skewed", None), ("uniform", {"expert": 2})],
)
def test_megablox_matches_dense(routing, mesh_shape):
    inputs = _moe_inputs(routing)
    mesh = None
    if mesh_shape is not None:
        mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:2])
    out, grads = _moe_value_and_grads("megablox_interpret", inputs, mesh)
    ref_out, ref_grads = _moe_value_and_grads("dense", inputs, mesh)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    _assert_close(out, ref_out, 1e-5)
    _assert_close(grads, ref_grads, 1e-5)


def test_megablox_row_layout_and_tiles():
    from qwen3next_jax.ops import moe_experts

    assert moe_experts.row_layout("megablox", 100, 8, None)[0] == 128
    assert moe_experts.row_layout("megablox", 1000, 8, None)[0] == 1024
    assert moe_experts.row_layout("megablox", 5000, 8, None)[0] == 5120
    assert moe_experts._megablox_tiling(5120, 2048, 512) == (512, 512, 512)
    assert moe_experts._megablox_tiling(384, 64, 96) == (384, 64, 96)


# ------------------------------------------------------------------------ TPU ahead of time


def _tpu_devices():
    pytest.importorskip("libtpu")
    # Other processes on this host may hold libtpu's lock; compiling needs no exclusive chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices


@pytest.fixture
def _no_persistent_cache():
    # TPU executables cannot be read back without a TPU client: keep them out of the cache.
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)


@pytest.mark.usefixtures("_no_persistent_cache")
def test_tpu_compiles_splash_and_megablox():
    """The real (not interpret) kernels, forward and backward, partitioned over a 4-chip v5p
    mesh and compiled to TPU code from this CPU host; 'auto' picks them from the mesh."""
    mesh = sharding.make_mesh({"data": 2, "tensor": 2}, devices=_tpu_devices())
    bf16 = jnp.bfloat16
    # conftest's global 'highest' would ask Mosaic for fp32 passes on bf16 operands, which it
    # rejects; training runs at the default precision.
    with sharding.use_mesh(mesh), jax.default_matmul_precision("default"):
        assert attention.resolve_backend("auto") == "splash"
        assert moe._resolve_backend("auto") == "megablox"

        def attn_grads(q, k, v, seg):
            def loss(q, k, v):
                out = attention.causal_attention(q, k, v, segment_ids_BT=seg)
                return jnp.sum(out.astype(jnp.float32))

            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        B, T, N, K, H = 2, 256, 4, 2, 256
        q_s = NamedSharding(mesh, P("data", None, "tensor", None))
        b_s = NamedSharding(mesh, P("data"))
        shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, H)]
        args = [jax.ShapeDtypeStruct(s, bf16) for s in shapes]
        args.append(jax.ShapeDtypeStruct((B, T), jnp.int32))
        compiled = (
            jax.jit(attn_grads, in_shardings=(q_s, b_s, b_s, b_s), out_shardings=(q_s, b_s, b_s))
            .lower(*args)
            .compile()
        )
        assert "tpu_custom_call" in compiled.as_text()

        def moe_grads(x, w, idx, wg, wu, wd):
            def loss(x, wg, wu, wd):
                y, _ = moe.routed_experts(x, w, idx, wg, wu, wd, mesh=mesh)
                return jnp.sum(y.astype(jnp.float32))

            return jax.grad(loss, argnums=(0, 1, 2, 3))(x, wg, wu, wd)

        tok, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        args = [
            jax.ShapeDtypeStruct((256, 256), bf16),
            jax.ShapeDtypeStruct((256, 2), jnp.float32),
            jax.ShapeDtypeStruct((256, 2), jnp.int32),
            jax.ShapeDtypeStruct((8, 256, 128), bf16),
            jax.ShapeDtypeStruct((8, 256, 128), bf16),
            jax.ShapeDtypeStruct((8, 128, 256), bf16),
        ]
        compiled = (
            jax.jit(moe_grads, in_shardings=(tok, tok, tok, rep, rep, rep)).lower(*args).compile()
        )
        assert compiled.as_text().count("tpu_custom_call") >= 6  # 3 gmm forward, 3+3 backward
