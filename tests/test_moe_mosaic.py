"""The Mosaic GPU products (ops/moe_mosaic.py): that they lower for CUDA from any host
(shared-memory budget and layouts are checked at lowering), their shape errors, the forward down
kernel's values and the weight-gradient kernel's pipeline in Pallas's GPU interpret mode on the
CPU, and, on a Hopper GPU, all three kernels' values against a reference (run on the device
machine with JAX_PLATFORMS=cuda,cpu; bench/mgpu_probe.py checks them at the benchmark's shapes
too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3next_jax.ops import moe_mosaic

G, F, D = 4, 128, 512
TILES = [2, -1, 0, 3, 3, -1, 1, 0]  # expert of each 128-row tile; -1 = unused
HALF = [0, 0, 1, 0, 1, 0, 0, 1]  # half tiles: the first 64 rows multiplied, the rest zero


def _operands(op, dtype=jnp.bfloat16):
    tg = jnp.asarray(TILES, jnp.int32)
    r = len(TILES) * moe_mosaic.TILE_M
    ks = jax.random.split(jax.random.key(0), 4)
    rows = lambda k: jax.random.normal(k, (r, F), jnp.float32).astype(dtype)  # noqa: E731
    if op == "down":
        w = (jax.random.normal(ks[1], (G, F, D)) / F**0.5).astype(dtype)
        return tg, rows(ks[0]), w
    wg = (jax.random.normal(ks[2], (G, D, F)) / F**0.5).astype(dtype)
    wu = (jax.random.normal(ks[3], (G, D, F)) / F**0.5).astype(dtype)
    return tg, rows(ks[0]), rows(ks[1]), wg, wu


def _reference(op, tg, *args, half=HALF):
    """Per-tile products in fp32 numpy, the last 64 rows of half tiles 0; unused tiles as NaN
    (the kernel leaves them unwritten)."""
    f32 = [np.asarray(a.astype(jnp.float32)) for a in args]
    tm = moe_mosaic.TILE_M
    out = np.full((len(TILES) * tm, D), np.nan, np.float32)
    for t, e in enumerate(np.asarray(tg)):
        if e < 0:
            continue
        rows = slice(t * tm, (t + 1) * tm)
        if op == "down":
            out[rows] = f32[0][rows] @ f32[1][e]
        else:
            out[rows] = f32[0][rows] @ f32[2][e].T + f32[1][rows] @ f32[3][e].T
        if half[t]:
            out[t * tm + tm // 2 : (t + 1) * tm] = 0.0
    return out


FNS = {"down": moe_mosaic.down, "dx": moe_mosaic.dx}


def _assert_matches_reference(op, got, args, half=HALF):
    """got (the kernel's [R, D] output) equals _reference on the used tiles' rows."""
    got = np.asarray(got.astype(jnp.float32))
    want = _reference(op, *args, half=half)
    used = ~np.isnan(want[:, 0])
    np.testing.assert_allclose(got[used], want[used], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("op", ["down", "dx"])
def test_lowers_for_cuda(op):
    """The default configs lower to one Mosaic GPU custom call (fails on a shared-memory budget
    overrun, a bad swizzle or an API break, without a GPU)."""
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _operands(op)]
    half = jnp.asarray(HALF, jnp.int32)
    fn = jax.jit(lambda *a: FNS[op](*a, half_T=half))
    text = fn.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1


def test_shape_errors_name_the_dimension():
    tg, h, w = _operands("down")
    with pytest.raises(ValueError, match="rows = 1000 is not a multiple of 128"):
        moe_mosaic.down(tg, h[:1000], w)
    with pytest.raises(ValueError, match="N = 320 is not a multiple of 128"):
        moe_mosaic.down(tg, h, w[:, :, :320])
    assert moe_mosaic.fits("down", 2048, 512) and not moe_mosaic.fits("down", 320, 512)
    assert not moe_mosaic.fits("dx", 2048, 48)
    with pytest.raises(ValueError, match="epi_n 48 must divide bn 128"):
        moe_mosaic.Config(epi_n=48)


@pytest.mark.parametrize("halves", [False, True])
def test_down_matches_reference_in_interpret_mode(halves):
    """The forward down kernel run by Pallas's GPU interpret mode on the CPU (TMA, barriers and
    the warp-specialised pipeline simulated): its values, with and without half tiles. (dx reads
    transposed weight tiles, which JAX 0.10.2's interpreter does not model: a GPU-only check.)"""
    args = _operands("down")
    half = HALF if halves else [0] * len(TILES)
    got = moe_mosaic.down(*args, half_T=jnp.asarray(half, jnp.int32), interpret=True)
    _assert_matches_reference("down", got, args, half)


@pytest.mark.skipif(not moe_mosaic.supported(), reason="needs a Hopper GPU (JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("op", ["down", "dx"])
def test_matches_reference_on_hopper(op):
    args = _operands(op)
    half = jnp.asarray(HALF, jnp.int32)
    got = jax.jit(lambda *a: FNS[op](*a, half_T=half))(*args)
    _assert_matches_reference(op, got, args)


@pytest.mark.parametrize(
    "config, num_sms",
    [(moe_mosaic.Config(bk=32, stages=3, delay=0), 3), (moe_mosaic.Config(stages=2), 1)],
)
def test_down_ring_configs_in_interpret_mode(config, num_sms):
    """The load ring with other depths, steps and SM counts than the default: 3 stages over 4
    steps a tile (the ring's position moves on between tiles) on 3 SMs; 2 stages, one SM walking
    every tile with one wgmma group in flight."""
    args = _operands("down")
    half = jnp.asarray(HALF, jnp.int32)
    got = moe_mosaic.down(*args, half_T=half, config=config, num_sms=num_sms, interpret=True)
    _assert_matches_reference("down", got, args)


# The weight gradients: groups of 150, 0, 64 and 300 rows on 128-aligned starts (an empty group,
# one that ends on a step boundary, one spanning three tiles); b's rows past a group's end are 0,
# as the layout's padding
WG_SIZES = [150, 0, 64, 300]
A_COLS, N_COLS = 256, 128


def _wgrad_operands():
    sizes = np.asarray(WG_SIZES)
    tm = moe_mosaic.TILE_M
    padded = -(-sizes // tm) * tm
    starts = np.cumsum(padded) - padded
    r = int(padded.sum())
    used = np.zeros(r, bool)
    for s0, n in zip(starts, sizes, strict=True):
        used[s0 : s0 + n] = True
    ks = jax.random.split(jax.random.key(1), 3)
    a = jax.random.normal(ks[0], (r, A_COLS)).astype(jnp.bfloat16)
    bs = [
        jnp.where(used[:, None], jax.random.normal(k, (r, N_COLS)), 0).astype(jnp.bfloat16)
        for k in ks[1:]
    ]
    return jnp.asarray(starts, jnp.int32), jnp.asarray(starts + sizes, jnp.int32), a, bs


def test_weight_grad_lowers_for_cuda():
    r0, r1, a, bs = _wgrad_operands()
    sd = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    fn = jax.jit(lambda r0, r1, a, b1, b2: moe_mosaic.grouped_weight_grad(r0, r1, a, [b1, b2]))
    text = fn.trace(*map(sd, (r0, r1, a, *bs))).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1
    assert moe_mosaic.fits("wgrad", 512, 2048) and not moe_mosaic.fits("wgrad", 512, 2000)
    with pytest.raises(ValueError, match="A = 200 is not a multiple of 128"):
        moe_mosaic.grouped_weight_grad(r0, r1, a[:, :200], bs)


def test_weight_grad_pipeline_in_interpret_mode(monkeypatch):
    """The weight-gradient kernel's pipeline in interpret mode: units of two b operands over
    groups of 0 to 3 steps, the ring running on across units on 3 SMs, both consumers' stores.
    JAX 0.10.2's interpreter models no transposed operand, so a's tile is used as it is (128-row
    steps make it square): each step adds a_step @ b_step instead of a_step^T @ b_step, which the
    reference below computes alike; the transpose itself is checked on the GPU."""
    monkeypatch.setattr(moe_mosaic, "_lhs_transposed", lambda ref: ref)
    r0, r1, a, bs = _wgrad_operands()
    bk = 128
    cfg = moe_mosaic.Config(bk=bk, stages=3)
    got = moe_mosaic.grouped_weight_grad(r0, r1, a, bs, config=cfg, num_sms=3, interpret=True)
    af = np.asarray(a, np.float32)
    for out, b in zip(got, bs, strict=True):
        bf = np.asarray(b, np.float32)
        for g, (s0, n) in enumerate(zip(np.asarray(r0), WG_SIZES, strict=True)):
            want = np.zeros((A_COLS, N_COLS), np.float32)
            for st in range(-(-n // bk)):
                rows = slice(s0 + st * bk, s0 + (st + 1) * bk)
                for ia in range(A_COLS // bk):
                    cols = slice(ia * bk, (ia + 1) * bk)
                    want[cols] += af[rows, cols] @ bf[rows]
            np.testing.assert_allclose(np.asarray(out[g], np.float32), want, rtol=2e-2, atol=0.1)


def test_weight_grad_reference_is_per_group_product():
    r0, r1, a, bs = _wgrad_operands()
    got = moe_mosaic.weight_grad_reference(r0, r1, a, bs, out_dtype=jnp.float32)
    af, bf = np.asarray(a, np.float32), np.asarray(bs[1], np.float32)
    s0, n = int(r0[3]), WG_SIZES[3]
    np.testing.assert_allclose(got[1][3], af[s0 : s0 + n].T @ bf[s0 : s0 + n], rtol=1e-5, atol=1e-3)
    assert float(jnp.abs(got[0][1]).max()) == 0.0  # the empty group


@pytest.mark.skipif(not moe_mosaic.supported(), reason="needs a Hopper GPU (JAX_PLATFORMS=cuda)")
def test_weight_grad_matches_reference_on_hopper():
    r0, r1, a, bs = _wgrad_operands()
    got = jax.jit(moe_mosaic.grouped_weight_grad)(r0, r1, a, bs)
    want = moe_mosaic.weight_grad_reference(r0, r1, a, bs, out_dtype=jnp.float32)
    for g_, w_ in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g_, np.float32), w_, rtol=2e-2, atol=0.1)
