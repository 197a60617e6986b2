"""Grouped SwiGLU over tile-aligned groups with Pallas (Triton) kernels: the dropless GPU path.

Layout: rows are grouped by expert and every group starts on a multiple of TILE_M, so each row
tile belongs to one expert (`tile_group`, -1 for unused tiles). This is megablox's grouped GEMM
with the boundary handling moved into the layout: at most G*(TILE_M-1) padding rows, no masks.

Five kernels, all fp32-accumulating, none materialising per-tile weight copies:
  forward   h, g, u = swiglu(x @ Wg[e], x @ Wu[e])      (one pass over x, two accumulators)
            y       = h @ Wd[e]
  backward  dg, du  = swiglu'(dy @ Wd[e]^T; g, u)       (epilogue fused)
            dx      = dg @ Wg[e]^T + du @ Wu[e]^T
            dWd[e]  = h_e^T dy_e;  dWg[e], dWu[e] = x_e^T dg_e, x_e^T du_e   (per-expert loops,
                                                  one kernel each; TGMM_PAIR: dWg, dWu in one)
Launch config: BLOCK_N / BLOCK_K / NUM_WARPS / NUM_STAGES, per kernel overridden by TUNE. A group's
last tile with at most TILE_M / 2 used rows is a half tile (HALF_TILES): the row kernels that
know it compute its first half only. On a Hopper GPU the fused path's two products without a row
gather, the forward down product and dx, run as Mosaic GPU kernels instead (MOSAIC_KERNELS,
ops/moe_mosaic.py), and so do the weight gradients listed in SORTED_WGRAD (by default dW_gate and
dW_up), over sorted rows that the gathering Triton kernel copies out in programs of their own.
Padding rows hold x = 0 and dy = 0 (the dispatch fills them so), hence contribute nothing to dW.
On a non-GPU platform the kernels run in Pallas interpret mode (tests).

Fused variant (`fused_routed_swiglu`, backend "pallas_fused"): the same layout and kernels, but no
[R, D] row buffer exists in either direction. The gate-up kernel and the dW_gate/dW_up kernel read
row r as x[tok[r]] from the token-major x (a row gather by pointer arithmetic, `x_ref[tok, cols]`);
the gate-up epilogue multiplies by the routing weight, h = w * swiglu, so the output is a plain
K-row sum (`sum_rows`, a gather-sum kernel, as is dx's sum over each token's K rows); the down
backward and dW_down kernels read the output cotangent as gy[tok[r]] (the combine's transpose)
and the down backward also yields dL/dw = <gy[tok] @ Wd^T, swiglu> (by default as two kernels, the
product and a row-wise epilogue: DOWN_BWD_SPLIT). Empty
rows read token 0 with weight 0, so h = 0 and dh = 0 there: they add nothing to any gradient.
Per 32K tokens (R ~ 360K rows, D = 2048, bf16) this drops the sorted copy of x (write + read
~2.9 GB), the combine backward's two [R, D] reads and one write (~4.7 GB) and both [R, D]
residuals (x rows and y rows, 3.2 GB of memory). On a Hopper GPU with "gate_up" in SORTED_WGRAD
(the default) the x rows come back as a residual (~1.6 GB a layer at 32K tokens; one layer's
worth under per-layer remat), bought for the faster weight gradients; SORTED_WGRAD = () drops it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qwen3next_jax import sharding
from qwen3next_jax.ops import moe_mosaic
from qwen3next_jax.ops.moe_dispatch import round_up

TILE_M = 128  # rows per tile; the layout pads each group to this
# A group's last tile with at most TILE_M / 2 used rows is a half tile: the fused path's gate-up,
# down-backward product and dx kernels compute its first TILE_M / 2 rows only and store zeros in
# the rest (at ~640 rows an expert, half the groups end in one; the padding computed drops from
# ~64 rows a group to ~32)
HALF_TILES = True
BLOCK_N = 128  # output columns per program
BLOCK_K = 64  # contraction step
TGMM_ROWS = 64  # rows per step of the per-expert weight-gradient loop (divides TILE_M)
# ... of the dW_gate/dW_up loop (two accumulators; 128 rows: 4.40 -> 4.06 ms at 32K tokens on an
# H200, while dW_down with 128 rows went 1.88 -> 2.55 ms)
TGMM_ROWS_PAIR = 128
# dW_gate and dW_up in one kernel sharing each x tile (two [128, 128] accumulators), or as two
# single-output kernels like dW_down (32K tokens on an H200, 8 warps: 4.07 ms paired, 3.87 for
# the two single ones)
TGMM_PAIR = False
# The fused down backward as one kernel with the SwiGLU backward in its epilogue (False), or as
# the plain product dL/dh' = gy[tok] @ Wd^T and the epilogue as a second, row-wise kernel. 32K
# tokens on an H200: one kernel 2.46 ms (255 registers, 548 B of spills a thread, one program a
# multiprocessor: the epilogue's loads are not hidden); split 1.54 + 0.54
DOWN_BWD_SPLIT = True
NUM_WARPS = 8
NUM_STAGES = 3
# Per-kernel launch overrides, {kernel: {"bn": output columns, "bk": contraction step, "warps": n,
# "stages": n, "bm": rows (row kernels; divides TILE_M), "ba" / "bb": the dW tile's sides}} for
# kernels "gateup", "down", "down_bwd" (with DOWN_BWD_SPLIT its product), "dx", "tgmm" (each
# single-output dW kernel) and "tgmm_pair" (the paired dW_gate / dW_up kernel); unset keys fall
# back to BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES, TILE_M. Chosen one kernel at a time at 32K
# tokens on an H200 (bench/RESULTS.md, sessions 6 and 7): dW kernels on 4 warps (dW_down 1.87 ->
# 1.60 ms), dx in 32-deep steps (3.12 -> 2.97) on 4 warps (3.11 -> 2.99 in one run), 4 stages
# for the gate-up (2.74 -> 2.66), 3 for the split down backward's product (1.59 with 4, 1.54
# with 3). Rejected: 64-row blocks (TILE_M 64 or bm 64: all kernels 17.4 -> 31 ms, dx alone
# 15-17 ms), dW tiles of 256 x 128 on 8 warps (dW_gate + dW_up 3.32 -> 4.74 / 3.96 ms), 32-row
# dW steps (4.00), the forward down with 4 stages (1.51 -> 1.92) or 128-deep steps (2.08).
TUNE: dict = {
    "tgmm": {"warps": 4},
    "dx": {"bk": 32, "warps": 4},
    "down_bwd": {"stages": 3},
    "gateup": {"stages": 4},
}


# Kernels of the fused path that run as Mosaic GPU kernels (ops/moe_mosaic.py: TMA + wgmma,
# warp-specialised, ping-pong) on a Hopper GPU instead of Triton: "down" (forward), "dx" and
# "wgrad" (the weight gradients named in SORTED_WGRAD, over sorted rows). 32K tokens on an H200
# (bench/mgpu_probe.py, sessions 10-11): down 1.20-1.26 ms against Triton's 1.75-1.78, dx
# 2.45-2.55 against 3.33-3.36, dW_gate + dW_up 2.15 against 3.31
MOSAIC_KERNELS: tuple = ("down", "dx", "wgrad")


def _mosaic(name: str, a, n: int) -> bool:
    """Whether kernel `name` runs as Mosaic GPU on row operand a [R, K] with N output columns:
    listed, a Hopper GPU, a 16-bit a (fp32 stays on Triton's exact-fp32 products), the layout's
    TILE_M, N and K multiples of its tile."""
    if name not in MOSAIC_KERNELS or _interpret() or a.dtype.itemsize != 2:
        return False
    if TILE_M != moe_mosaic.TILE_M:  # its tiles are 128 rows, two halves of 64
        return False
    return moe_mosaic.fits(name, n, a.shape[1]) and moe_mosaic.supported()


def _tune(name: str, key: str, default):
    return TUNE.get(name, {}).get(key, default)


def _blocks(name: str, n: int, k: int) -> tuple[int, int]:
    """(output columns, contraction step) of kernel `name` for an output width n, depth k."""
    return _block(n, _tune(name, "bn", BLOCK_N)), _block(k, _tune(name, "bk", BLOCK_K))


def _row_blocks(name: str, tg, th=None):
    """(rows per program, the group of each row block, its half-tile flag) of row-tile kernel
    `name`: TUNE's "bm" splits every TILE_M tile into TILE_M / bm blocks of the same group (bm
    divides TILE_M; no half tiles then). th None: no half tiles."""
    bm = min(_tune(name, "bm", TILE_M), TILE_M)
    if TILE_M % bm:
        raise ValueError(f"MoE pallas backend: TUNE[{name!r}]['bm']={bm} must divide {TILE_M}")
    if bm != TILE_M:
        tg = jnp.repeat(tg, TILE_M // bm)
    if th is None or bm != TILE_M:
        th = jnp.zeros_like(tg)
    return bm, tg, th


def _by_tile(tg_ref, th_ref, i, bm, product, zero):
    """Runs row block i: product(e, n) computes and stores its first n rows with expert e's
    weights, zero(rows) stores zeros. A half tile (th = 1, at most bm / 2 used rows) computes
    bm / 2 rows and zeroes the rest; an unused block (e < 0) is all zeros."""
    e, half = tg_ref[i], th_ref[i]

    @pl.when((e >= 0) & (half == 0))
    def _():
        product(e, bm)

    @pl.when((e >= 0) & (half != 0))
    def _():
        product(e, bm // 2)
        zero(pl.ds(bm // 2, bm // 2))

    @pl.when(e < 0)
    def _():
        zero(pl.ds(0, bm))


def _interpret() -> bool:
    return sharding.target_platform() != "gpu"


SMEM_BUDGET = 200 * 1024  # bytes of pipelined operand buffers (H100/H200 allow 227 KiB)


def _compiler_params(stage_bytes: int, num_warps: int | None = None, name: str = ""):
    """Triton params; fewer pipeline stages when NUM_STAGES copies of one step's operand tiles
    (`stage_bytes`) would not fit in shared memory (fp32 inputs, two-weight kernels)."""
    if _interpret():
        return None
    from jax.experimental.pallas import triton as plgpu

    stages = max(1, min(_tune(name, "stages", NUM_STAGES), SMEM_BUDGET // stage_bytes))
    warps = _tune(name, "warps", num_warps or NUM_WARPS)
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _block(dim: int, pref: int) -> int:
    b = min(pref, dim)
    if dim % b:
        raise ValueError(f"MoE pallas backend: dimension {dim} is not a multiple of block {b}")
    return b


def _mm(a, b, contract=(1, 0)):
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=prec,
        preferred_element_type=jnp.float32,
    )


def _sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def _call(kernel, grid, in_specs, out_specs, out_shape, stage_bytes, num_warps=None, name=""):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=_interpret(),
        compiler_params=_compiler_params(stage_bytes, num_warps, name),
    )


def _full(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _gateup_kernel(tg_ref, x_ref, wg_ref, wu_ref, h_ref, g_ref, u_ref, *, bk):
    j, i = pl.program_id(0), pl.program_id(1)
    e = tg_ref[i]
    bm, bn = h_ref.shape
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

    @pl.when(e >= 0)
    def _():
        def body(k, acc):
            ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
            xk = x_ref[:, ks]
            return acc[0] + _mm(xk, wg_ref[e, ks, cols]), acc[1] + _mm(xk, wu_ref[e, ks, cols])

        z = jnp.zeros((bm, bn), jnp.float32)
        acc_g, acc_u = jax.lax.fori_loop(0, x_ref.shape[1] // bk, body, (z, z))
        g_ref[...] = acc_g.astype(g_ref.dtype)
        u_ref[...] = acc_u.astype(u_ref.dtype)
        h_ref[...] = (acc_g * _sigmoid(acc_g) * acc_u).astype(h_ref.dtype)

    @pl.when(e < 0)
    def _():
        z = jnp.zeros((bm, bn), h_ref.dtype)
        h_ref[...], g_ref[...], u_ref[...] = z, z, z


def _down_kernel(tg_ref, h_ref, wd_ref, y_ref, *, bk):
    j, i = pl.program_id(0), pl.program_id(1)
    e = tg_ref[i]
    bm, bn = y_ref.shape
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

    @pl.when(e >= 0)
    def _():
        def body(k, acc):
            ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
            return acc + _mm(h_ref[:, ks], wd_ref[e, ks, cols])

        acc = jax.lax.fori_loop(0, h_ref.shape[1] // bk, body, jnp.zeros((bm, bn), jnp.float32))
        y_ref[...] = acc.astype(y_ref.dtype)

    @pl.when(e < 0)
    def _():
        y_ref[...] = jnp.zeros((bm, bn), y_ref.dtype)


def _down_bwd_kernel(tg_ref, dy_ref, wd_ref, g_ref, u_ref, dg_ref, du_ref, *, bk):
    j, i = pl.program_id(0), pl.program_id(1)
    e = tg_ref[i]
    bm, bn = dg_ref.shape
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

    @pl.when(e >= 0)
    def _():
        def body(k, acc):
            ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
            return acc + _mm(dy_ref[:, ks], wd_ref[e, cols, ks], contract=(1, 1))

        dh = jax.lax.fori_loop(0, dy_ref.shape[1] // bk, body, jnp.zeros((bm, bn), jnp.float32))
        g = g_ref[...].astype(jnp.float32)
        u = u_ref[...].astype(jnp.float32)
        s = _sigmoid(g)
        du_ref[...] = (dh * g * s).astype(du_ref.dtype)
        dg_ref[...] = (dh * u * s * (1.0 + g * (1.0 - s))).astype(dg_ref.dtype)

    @pl.when(e < 0)
    def _():
        z = jnp.zeros((bm, bn), dg_ref.dtype)
        dg_ref[...], du_ref[...] = z, z


def _dx_kernel(tg_ref, th_ref, dg_ref, du_ref, wg_ref, wu_ref, dx_ref, *, bk):
    j, i = pl.program_id(0), pl.program_id(1)
    bm, bn = dx_ref.shape
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

    def product(e, n):
        rows = pl.ds(0, n)

        def body(k, acc):
            ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
            acc = acc + _mm(dg_ref[rows, ks], wg_ref[e, cols, ks], contract=(1, 1))
            return acc + _mm(du_ref[rows, ks], wu_ref[e, cols, ks], contract=(1, 1))

        acc = jax.lax.fori_loop(0, dg_ref.shape[1] // bk, body, jnp.zeros((n, bn), jnp.float32))
        dx_ref[rows, :] = acc.astype(dx_ref.dtype)

    def zero(rows):
        dx_ref[rows, :] = jnp.zeros((rows.size, bn), dx_ref.dtype)

    _by_tile(tg_ref, th_ref, i, bm, product, zero)


def _tgmm_kernel(r0_ref, r1_ref, *refs, bm, n_b, gather):
    """out_i[e] = sum over the rows [r0[e], r1[e]) of group e, in bm-row steps (the last one
    partly padding), of a_rows^T @ b_i_rows (one or two b's). gather = (a, b) flags: a flagged
    operand is token-major and row r reads its row tok[r] (refs[0] = tok_R then)."""
    if any(gather):
        tok_ref, refs = refs[0], refs[1:]
    a_ref, b_refs, o_refs = refs[0], refs[1 : 1 + n_b], refs[1 + n_b :]
    ib, ia, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ba, bb = o_refs[0].shape
    acols = pl.ds(pl.multiple_of(ia * ba, ba), ba)
    bcols = pl.ds(pl.multiple_of(ib * bb, bb), bb)

    def body(t, accs):
        rows = pl.ds(pl.multiple_of(t * bm, bm), bm)
        tok = tok_ref[rows] if any(gather) else None
        a = a_ref[tok if gather[0] else rows, acols]
        return tuple(
            acc + _mm(a, b_ref[tok if gather[1] else rows, bcols], contract=(0, 0))
            for acc, b_ref in zip(accs, b_refs, strict=True)
        )

    z = jnp.zeros((ba, bb), jnp.float32)
    # r0 is a multiple of TILE_M, hence of bm; steps past the group's last row would read only
    # padding (zeros): at 32K tokens (~640 rows an expert) half the groups end a 64-row step
    # before their last 128-row tile does
    accs = jax.lax.fori_loop(r0_ref[e] // bm, (r1_ref[e] + bm - 1) // bm, body, (z,) * n_b)
    for o_ref, acc in zip(o_refs, accs, strict=True):
        o_ref[...] = acc.astype(o_ref.dtype)


# Columns per step of the row-copy programs (_copy_rows)
COPY_COLS = 256


def _copy_rows(tg_ref, th_ref, i, tok_ref, a_ref, rows_ref):
    """rows_ref [bm, A] = a[tok] for row block i's used rows (its first half in a half tile;
    nothing in an unused tile): the gathered rows that the Mosaic weight gradients read."""
    bm, a = rows_ref.shape
    bc = _block(a, COPY_COLS)

    def copy(e, n):
        del e
        rows = pl.ds(0, n)
        tok = tok_ref[rows]

        def body(c, carry):
            cs = pl.ds(pl.multiple_of(c * bc, bc), bc)
            rows_ref[rows, cs] = a_ref[tok, cs]
            return carry

        jax.lax.fori_loop(0, a // bc, body, 0)

    _by_tile(tg_ref, th_ref, i, bm, copy, lambda rows: None)


def _with_rows_out(kernel, n_col):
    """kernel run by column blocks j < n_col; with a trailing rows_ref, column block n_col
    (one more program per row block, memory-bound among compute-bound ones) copies the row
    block's gathered rows instead. The copy is a program of its own: as a conditional store
    inside the product's loop (column block 0 storing the rows it loads) the products came out
    wrong on an H200 (JAX 0.11.2's Triton)."""

    def run(tg_ref, th_ref, tok_ref, a_ref, *refs, rows_out):
        # the program ids are read here and passed in: Pallas's interpreter cannot read them
        # inside a conditional's branch
        j, i = pl.program_id(0), pl.program_id(1)
        if not rows_out:
            return kernel(tg_ref, th_ref, tok_ref, a_ref, *refs, ids=(j, i))
        *refs, rows_ref = refs
        pl.when(j < n_col)(lambda: kernel(tg_ref, th_ref, tok_ref, a_ref, *refs, ids=(j, i)))
        pl.when(j == n_col)(lambda: _copy_rows(tg_ref, th_ref, i, tok_ref, a_ref, rows_ref))

    run.__name__ = getattr(kernel, "func", kernel).__name__  # the name in profiles and IR
    return run


def _gateup_gather_kernel(
    tg_ref, th_ref, tok_ref, x_ref, w_ref, wg_ref, wu_ref, *out_refs, bk, ids
):
    """_gateup_kernel reading row r as x[tok[r]] from the token-major x (no sorted copy) and
    writing h = w[r] * swiglu (the routing weight folded in, so the combine is a plain row sum).
    out_refs = (h,) or (h, g, u) when the backward's residuals are wanted. ids: the program's
    (column block, row block)."""
    j, i = ids
    bm, bn = out_refs[0].shape
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

    def product(e, n):
        rows = pl.ds(0, n)
        tok = tok_ref[rows]

        def body(k, acc):
            ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
            xk = x_ref[tok, ks]  # row gather: pointer arithmetic on tok, no copy of x
            return acc[0] + _mm(xk, wg_ref[e, ks, cols]), acc[1] + _mm(xk, wu_ref[e, ks, cols])

        z = jnp.zeros((n, bn), jnp.float32)
        acc_g, acc_u = jax.lax.fori_loop(0, x_ref.shape[1] // bk, body, (z, z))
        w = w_ref[rows][:, None]
        out_refs[0][rows, :] = (w * acc_g * _sigmoid(acc_g) * acc_u).astype(out_refs[0].dtype)
        if len(out_refs) == 3:
            out_refs[1][rows, :] = acc_g.astype(out_refs[1].dtype)
            out_refs[2][rows, :] = acc_u.astype(out_refs[2].dtype)

    def zero(rows):
        for o_ref in out_refs:
            o_ref[rows, :] = jnp.zeros((rows.size, bn), o_ref.dtype)

    _by_tile(tg_ref, th_ref, i, bm, product, zero)


def _swiglu_bwd_tile(dwh, g_ref, u_ref, w_ref, dg_ref, du_ref, gw_ref):
    """Backward of h = w * swiglu(g, u) on one [rows, cols] tile, from dwh (fp32, h's cotangent
    before the routing weight): dg, du, and gw = <dwh, swiglu(g, u)> over the tile's columns."""
    g = g_ref[...].astype(jnp.float32)
    u = u_ref[...].astype(jnp.float32)
    s = _sigmoid(g)
    gw_ref[...] = jnp.sum(dwh * (g * s * u), axis=1)
    dh = w_ref[...][:, None] * dwh
    du_ref[...] = (dh * g * s).astype(du_ref.dtype)
    dg_ref[...] = (dh * u * s * (1.0 + g * (1.0 - s))).astype(dg_ref.dtype)


def _gathered_dot_t(tok_ref, a_ref, w_ref, e, j, bm, bn, bk):
    """[bm, bn] fp32: a[tok] @ w[e, column block j]^T for the first bm rows of a row block (rows
    gathered by token from the token-major a [T, A]; w [G, N, A])."""
    tok = tok_ref[pl.ds(0, bm)]
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

    def body(k, acc):
        ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
        return acc + _mm(a_ref[tok, ks], w_ref[e, cols, ks], contract=(1, 1))

    return jax.lax.fori_loop(0, a_ref.shape[1] // bk, body, jnp.zeros((bm, bn), jnp.float32))


def _dwh_gather_kernel(tg_ref, th_ref, tok_ref, gy_ref, wd_ref, o_ref, *, bk, ids):
    """The down backward's product alone (DOWN_BWD_SPLIT): o = gy[tok] @ Wd[e]^T. ids: the
    program's (column block, row block)."""
    j, i = ids
    bm, bn = o_ref.shape

    def product(e, n):
        dwh = _gathered_dot_t(tok_ref, gy_ref, wd_ref, e, j, n, bn, bk)
        o_ref[pl.ds(0, n), :] = dwh.astype(o_ref.dtype)

    def zero(rows):
        o_ref[rows, :] = jnp.zeros((rows.size, bn), o_ref.dtype)

    _by_tile(tg_ref, th_ref, i, bm, product, zero)


def _down_bwd_gather_kernel(
    tg_ref, tok_ref, w_ref, gy_ref, wd_ref, g_ref, u_ref, dg_ref, du_ref, gw_ref, *, bk
):
    """Backward of h = w * swiglu(g, u) and y = h @ Wd, with y's cotangent read as gy[tok[r]]
    from the token-major output cotangent (the combine's transpose, fused). dL/dw[r] =
    <gy[tok[r]] @ Wd^T, swiglu(g, u)>; each column block writes its share to gw[j, rows]."""
    j, i = pl.program_id(0), pl.program_id(1)
    e = tg_ref[i]
    bm, bn = dg_ref.shape

    @pl.when(e >= 0)
    def _():
        dwh = _gathered_dot_t(tok_ref, gy_ref, wd_ref, e, j, bm, bn, bk)
        _swiglu_bwd_tile(dwh, g_ref, u_ref, w_ref, dg_ref, du_ref, gw_ref)

    @pl.when(e < 0)
    def _():
        z = jnp.zeros((bm, bn), dg_ref.dtype)
        dg_ref[...], du_ref[...] = z, z
        gw_ref[...] = jnp.zeros((bm,), gw_ref.dtype)


# Tokens x columns per program of the K-row sum (combine and dx): a [32, 256] fp32 accumulator
# is 32 registers a thread at 8 warps; each gathered row piece is 512 contiguous bytes
SUM_ROWS_T = 32
SUM_ROWS_D = 256


def _sum_rows_kernel(pos_ref, y_ref, o_ref):
    """o[t] = sum_k y[pos[k, t]] in fp32 for one [bt, bd] block (pos_ref [K, T] whole; a row
    index of R, "not placed", adds 0)."""
    i, j = pl.program_id(0), pl.program_id(1)
    bt, bd = o_ref.shape
    r = y_ref.shape[0]
    toks = pl.ds(pl.multiple_of(i * bt, bt), bt)
    cols = pl.ds(pl.multiple_of(j * bd, bd), bd)
    acc = jnp.zeros((bt, bd), jnp.float32)
    for k in range(pos_ref.shape[0]):
        p = pos_ref[k, toks]
        rows = y_ref[jnp.minimum(p, r - 1), cols].astype(jnp.float32)
        acc = acc + jnp.where((p < r)[:, None], rows, 0.0)
    o_ref[...] = acc.astype(o_ref.dtype)


def sum_rows(y_RD, pos_TK, out_dtype):
    """[T, D] out_dtype: sum over k of y[pos[t, k]] in fp32 (pos == R adds 0), one Pallas kernel.

    The same sum as moe_dispatch.sum_slot_rows, as its own kernel: XLA fuses that one into its
    consumers (at 32K tokens on an H200 the benchmark's combine landed in a 1.34 ms reduction
    fusion, against ~0.3 ms of bytes)."""
    r, d = y_RD.shape
    t, _ = pos_TK.shape
    bt, bd = min(SUM_ROWS_T, pl.next_power_of_2(t)), _block(d, SUM_ROWS_D)
    tp = round_up(t, bt)
    pos_KT = jnp.pad(pos_TK.T.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=r)
    out = _call(
        _sum_rows_kernel,
        (tp // bt, d // bd),
        [_full(pos_KT.shape), _full(y_RD.shape)],
        pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
        jax.ShapeDtypeStruct((tp, d), out_dtype),
        bt * bd * y_RD.dtype.itemsize,
    )(pos_KT, y_RD)
    return out[:t] if tp != t else out


def _tile_maps(sizes_G, start_G, num_rows):
    """tile_group [R/TILE_M] (-1 = unused tile) and each group's used rows [r0_G, r1_G)."""
    lo_G = start_G // TILE_M
    hi_G = lo_G + round_up(sizes_G, TILE_M) // TILE_M
    tiles = jnp.arange(num_rows // TILE_M, dtype=jnp.int32)
    # [tiles, G] compare (a few million at 32K tokens), not method="scan": a while loop that a
    # GPU runs as one launch per iteration, outside the step's command buffer
    g = jnp.searchsorted(hi_G, tiles, side="right", method="compare_all").astype(jnp.int32)
    g_safe = jnp.minimum(g, sizes_G.shape[0] - 1)
    valid = (g < sizes_G.shape[0]) & (tiles >= lo_G[g_safe])
    r0_G = start_G.astype(jnp.int32)
    return jnp.where(valid, g, -1), r0_G, r0_G + sizes_G.astype(jnp.int32)


def _half_tiles(tg, r1_G):
    """int32 [R / TILE_M]: 1 where tile t is its group's last and holds <= TILE_M / 2 used rows
    (all 0 with HALF_TILES off: the one place that switch is read)."""
    if not HALF_TILES:
        return jnp.zeros_like(tg)
    start = jnp.arange(tg.shape[0], dtype=jnp.int32) * TILE_M
    used = r1_G[jnp.maximum(tg, 0)] - start
    return ((tg >= 0) & (used <= TILE_M // 2)).astype(jnp.int32)


def _gateup(tg, x_RD, wg, wu):
    r, d = x_RD.shape
    f = wg.shape[2]
    (bm, tg, _), (bn, bk) = _row_blocks("gateup", tg), _blocks("gateup", f, d)
    out = jax.ShapeDtypeStruct((r, f), x_RD.dtype)
    tile = pl.BlockSpec((bm, bn), lambda j, i: (i, j))
    return _call(
        functools.partial(_gateup_kernel, bk=bk),
        (f // bn, r // bm),
        [
            _full(tg.shape),
            pl.BlockSpec((bm, d), lambda j, i: (i, 0)),
            _full(wg.shape),
            _full(wu.shape),
        ],
        [tile, tile, tile],
        [out, out, out],
        (bm * bk + 2 * bk * bn) * x_RD.dtype.itemsize,
        name="gateup",
    )(tg, x_RD, wg, wu)


def _down(tg, h_RF, wd):
    r, f = h_RF.shape
    d = wd.shape[2]
    (bm, tg, _), (bn, bk) = _row_blocks("down", tg), _blocks("down", d, f)
    return _call(
        functools.partial(_down_kernel, bk=bk),
        (d // bn, r // bm),
        [_full(tg.shape), pl.BlockSpec((bm, f), lambda j, i: (i, 0)), _full(wd.shape)],
        pl.BlockSpec((bm, bn), lambda j, i: (i, j)),
        jax.ShapeDtypeStruct((r, d), h_RF.dtype),
        (bm * bk + bk * bn) * h_RF.dtype.itemsize,
        name="down",
    )(tg, h_RF, wd)


def _down_bwd(tg, dy_RD, wd, g_RF, u_RF):
    r, d = dy_RD.shape
    f = wd.shape[1]
    (bm, tg, _), (bn, bk) = _row_blocks("down_bwd", tg), _blocks("down_bwd", f, d)
    tile = pl.BlockSpec((bm, bn), lambda j, i: (i, j))
    out = jax.ShapeDtypeStruct((r, f), g_RF.dtype)
    return _call(
        functools.partial(_down_bwd_kernel, bk=bk),
        (f // bn, r // bm),
        [_full(tg.shape), pl.BlockSpec((bm, d), lambda j, i: (i, 0)), _full(wd.shape), tile, tile],
        [tile, tile],
        [out, out],
        (bm * bk + bk * bn) * dy_RD.dtype.itemsize,
        name="down_bwd",
    )(tg, dy_RD, wd, g_RF, u_RF)


def _dx(tg, dg_RF, du_RF, wg, wu, th=None):
    r, f = dg_RF.shape
    d = wg.shape[1]
    (bm, tg, th), (bn, bk) = _row_blocks("dx", tg, th), _blocks("dx", d, f)
    rows = pl.BlockSpec((bm, f), lambda j, i: (i, 0))
    return _call(
        functools.partial(_dx_kernel, bk=bk),
        (d // bn, r // bm),
        [_full(tg.shape), _full(th.shape), rows, rows, _full(wg.shape), _full(wu.shape)],
        pl.BlockSpec((bm, bn), lambda j, i: (i, j)),
        jax.ShapeDtypeStruct((r, d), dg_RF.dtype),
        2 * (bm * bk + bk * bn) * dg_RF.dtype.itemsize,
        name="dx",
    )(tg, th, dg_RF, du_RF, wg, wu)


def _tgmm(r0_G, r1_G, a_RA, bs, out_dtype, tok_R=None, gather=(False, False)):
    """[G, A, B] per-group a^T b for each b in bs, over each group's rows [r0_G, r1_G). An
    operand flagged in `gather` is token-major ([T, A] / [T, B]) and row r reads tok_R[r]."""
    g = r0_G.shape[0]
    a = a_RA.shape[1]
    b = bs[0].shape[1]
    name = "tgmm_pair" if len(bs) == 2 else "tgmm"
    bn = _tune(name, "bn", BLOCK_N)
    ba, bb = _block(a, _tune(name, "ba", bn)), _block(b, _tune(name, "bb", bn))
    out_spec = pl.BlockSpec((None, ba, bb), lambda j, i, e: (e, i, j))
    rows = min(TGMM_ROWS_PAIR if len(bs) == 2 else TGMM_ROWS, TILE_M)
    if TILE_M % rows:
        raise ValueError(f"TGMM_ROWS(_PAIR)={rows} must divide TILE_M={TILE_M}")
    toks = [tok_R] if any(gather) else []
    return _call(
        functools.partial(_tgmm_kernel, bm=rows, n_b=len(bs), gather=tuple(gather)),
        (b // bb, a // ba, g),
        [_full(r0_G.shape), _full(r1_G.shape)] + [_full(x.shape) for x in (*toks, a_RA, *bs)],
        [out_spec] * len(bs),
        [jax.ShapeDtypeStruct((g, a, b), out_dtype)] * len(bs),
        rows * (ba + len(bs) * bb) * a_RA.dtype.itemsize,
        name=name,
    )(r0_G, r1_G, *toks, a_RA, *bs)


def _tgmm2(r0_G, r1_G, a_RA, b1, b2, out_dtype, **kw):
    """(a^T b1, a^T b2) per group: one paired kernel (TGMM_PAIR) or two single ones."""
    if TGMM_PAIR:
        return _tgmm(r0_G, r1_G, a_RA, [b1, b2], out_dtype, **kw)
    return tuple(_tgmm(r0_G, r1_G, a_RA, [b], out_dtype, **kw)[0] for b in (b1, b2))


def _gateup_gather(tg, tok_R, w_R, x_TD, wg, wu, residuals, th=None, rows_out=False):
    """(h,) or (h, g, u), each [R, F] in x's dtype; R = tok_R's length. rows_out: also the
    gathered rows x[tok] [R, D] (rows the weight gradients never read left unwritten)."""
    r, d = tok_R.shape[0], x_TD.shape[1]
    f = wg.shape[2]
    (bm, tg, th), (bn, bk) = _row_blocks("gateup", tg, th), _blocks("gateup", f, d)
    out = jax.ShapeDtypeStruct((r, f), x_TD.dtype)
    row_vec = pl.BlockSpec((bm,), lambda j, i: (i,))
    n_out = 3 if residuals else 1
    tile, rows, rows_shape = _rows_out_specs(rows_out, f // bn, bm, bn, (r, d), x_TD.dtype)
    kernel = functools.partial(_gateup_gather_kernel, bk=bk)
    return _call(
        functools.partial(_with_rows_out(kernel, f // bn), rows_out=rows_out),
        (f // bn + rows_out, r // bm),
        [_full(tg.shape), _full(th.shape), row_vec, _full(x_TD.shape), row_vec]
        + [_full(wg.shape), _full(wu.shape)],
        [tile] * n_out + rows,
        [out] * n_out + rows_shape,
        (bm * bk + 2 * bk * bn) * x_TD.dtype.itemsize,
        name="gateup",
    )(tg, th, tok_R, x_TD, w_R, wg, wu)


def _rows_out_specs(rows_out, n_col, bm, bn, rows_shape, dtype):
    """([bm, bn] output tile spec, [row spec], [row shape]) of a row kernel with n_col column
    blocks, and with rows_out the extra copy program's (_with_rows_out): its column block index
    is clamped (it writes no tile)."""
    if not rows_out:
        return pl.BlockSpec((bm, bn), lambda j, i: (i, j)), [], []
    tile = pl.BlockSpec((bm, bn), lambda j, i: (i, jnp.minimum(j, n_col - 1)))
    rows = pl.BlockSpec((bm, rows_shape[1]), lambda j, i: (i, 0))
    return tile, [rows], [jax.ShapeDtypeStruct(rows_shape, dtype)]


def _down_bwd_gather(tg, tok_R, w_R, gy_TD, wd, g_RF, u_RF, th=None, rows_out=False):
    """dg, du [R, F] in g's dtype; gw [J, R] fp32, shares of dL/dw to sum over J. th: half
    tiles (DOWN_BWD_SPLIT's product only). rows_out (DOWN_BWD_SPLIT only): the gathered rows
    gy[tok] [R, D] as a fourth output (as _gateup_gather's)."""
    r, f = g_RF.shape
    d = gy_TD.shape[1]
    (bm, tg, th), (bn, bk) = _row_blocks("down_bwd", tg, th), _blocks("down_bwd", f, d)
    tile = pl.BlockSpec((bm, bn), lambda j, i: (i, j))
    row_vec = pl.BlockSpec((bm,), lambda j, i: (i,))
    out = jax.ShapeDtypeStruct((r, f), g_RF.dtype)
    if DOWN_BWD_SPLIT:
        tile, rows, rows_shape = _rows_out_specs(rows_out, f // bn, bm, bn, (r, d), gy_TD.dtype)
        kernel = functools.partial(_dwh_gather_kernel, bk=bk)
        dwh, *gys = _call(
            functools.partial(_with_rows_out(kernel, f // bn), rows_out=rows_out),
            (f // bn + rows_out, r // bm),
            [_full(tg.shape), _full(th.shape), row_vec, _full(gy_TD.shape), _full(wd.shape)],
            [tile] + rows,
            [out] + rows_shape,
            (bm * bk + bk * bn) * gy_TD.dtype.itemsize,
            name="down_bwd",
        )(tg, th, tok_R, gy_TD, wd)
        return (*_swiglu_bwd_rows(dwh, g_RF, u_RF, w_R), *gys)
    if rows_out:
        raise ValueError("MoE pallas backend: the gathered cotangent rows need DOWN_BWD_SPLIT")
    return _call(
        functools.partial(_down_bwd_gather_kernel, bk=bk),
        (f // bn, r // bm),
        [_full(tg.shape), row_vec, row_vec, _full(gy_TD.shape), _full(wd.shape), tile, tile],
        [tile, tile, pl.BlockSpec((None, bm), lambda j, i: (j, i))],
        [out, out, jax.ShapeDtypeStruct((f // bn, r), jnp.float32)],
        (bm * bk + bk * bn) * gy_TD.dtype.itemsize,
        name="down_bwd",
    )(tg, tok_R, w_R, gy_TD, wd, g_RF, u_RF)


# Rows per program of the split down backward's epilogue (whole F-wide rows, so dL/dw is one
# row sum); 32K tokens on an H200: 16 rows 866 us, 8 rows 542 us (32 rows spill)
EPILOGUE_ROWS = 8


def _swiglu_bwd_kernel(dwh_ref, g_ref, u_ref, w_ref, dg_ref, du_ref, gw_ref):
    """dg, du and gw for EPILOGUE_ROWS rows (all F columns)."""
    dwh = dwh_ref[...].astype(jnp.float32)
    _swiglu_bwd_tile(dwh, g_ref, u_ref, w_ref, dg_ref, du_ref, gw_ref)


def _swiglu_bwd_rows(dwh_RF, g_RF, u_RF, w_R):
    """DOWN_BWD_SPLIT's epilogue, one memory-bound Pallas kernel (as XLA fusions it took 1.6 ms
    at 32K tokens on an H200: a transposing reduction). dwh_RF = gy[tok] @ Wd^T is h's cotangent
    before the routing weight w_R [R] fp32. Returns dg, du [R, F] in g's dtype and gw [1, R]
    fp32 = <dwh, swiglu(g, u)> (dL/dw per row)."""
    r, f = g_RF.shape
    bm = min(EPILOGUE_ROWS, TILE_M)  # R is a multiple of TILE_M
    rows = pl.BlockSpec((bm, f), lambda i: (i, 0))
    row_vec = pl.BlockSpec((bm,), lambda i: (i,))
    out = jax.ShapeDtypeStruct((r, f), g_RF.dtype)
    dg, du, gw_R = _call(
        _swiglu_bwd_kernel,
        (r // bm,),
        [rows, rows, rows, row_vec],
        [rows, rows, row_vec],
        [out, out, jax.ShapeDtypeStruct((r,), jnp.float32)],
        bm * f * 4,
    )(dwh_RF, g_RF, u_RF, w_R)
    return dg, du, gw_R[None]


@jax.custom_vjp
def _swiglu_tiles(tg, r0_G, r1_G, x_RD, wg, wu, wd):
    h, _, _ = _gateup(tg, x_RD, wg, wu)
    return _down(tg, h, wd)


def _swiglu_tiles_fwd(tg, r0_G, r1_G, x_RD, wg, wu, wd):
    h, g, u = _gateup(tg, x_RD, wg, wu)
    return _down(tg, h, wd), (tg, r0_G, r1_G, x_RD, wg, wu, wd, h, g, u)


def _swiglu_tiles_bwd(res, dy_RD):
    tg, r0_G, r1_G, x_RD, wg, wu, wd, h, g, u = res
    dy_RD = dy_RD.astype(x_RD.dtype)
    dg, du = _down_bwd(tg, dy_RD, wd, g, u)
    dx = _dx(tg, dg, du, wg, wu)
    (dwd,) = _tgmm(r0_G, r1_G, h, [dy_RD], wd.dtype)
    dwg, dwu = _tgmm2(r0_G, r1_G, x_RD, dg, du, wg.dtype)
    return None, None, None, dx, dwg, dwu, dwd


_swiglu_tiles.defvjp(_swiglu_tiles_fwd, _swiglu_tiles_bwd)


def tiled_swiglu(x_RD, sizes_G, start_G, w_gate_GDF, w_up_GDF, w_down_GFD):
    """Grouped SwiGLU on a TILE_M-aligned layout. x_RD [R, D] with R % TILE_M == 0; weights in
    x's dtype; D and F multiples of the block sizes (or smaller powers of two). Returns [R, D]."""
    if x_RD.shape[0] % TILE_M:
        raise ValueError(f"rows {x_RD.shape[0]} not a multiple of TILE_M={TILE_M}")
    tg, r0_G, r1_G = _tile_maps(sizes_G, start_G, x_RD.shape[0])
    return _swiglu_tiles(tg, r0_G, r1_G, x_RD, w_gate_GDF, w_up_GDF, w_down_GFD)


def _take(x, idx):
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _row_maps(pos_TK, src_R, weights_TK):
    """tok_R int32 (the token row r reads; 0 for empty rows) and w_R fp32 (its routing weight; 0
    for empty rows, which therefore add nothing anywhere: h = 0, dh = 0)."""
    t, k = pos_TK.shape
    tok_R = jnp.where(src_R < t * k, src_R // k, 0).astype(jnp.int32)
    return tok_R, _take(weights_TK.reshape(t * k).astype(jnp.float32), src_R)


def _fused_down(tg, th, h_RF, wd):
    """The forward down product of the fused path (its unused tiles' rows are never read)."""
    if _mosaic("down", h_RF, wd.shape[2]):
        return moe_mosaic.down(tg, h_RF, wd, half_T=th)
    return _down(tg, h_RF, wd)


# Which weight gradients of the fused path run as Mosaic GPU kernels on sorted rows where
# _sorted_wgrad allows: "gate_up" (the gate-up kernel then also writes the gathered x rows, an
# [R, D] residual) and "down" (the down backward's product writes the gathered cotangent rows,
# transient); the others stay Triton kernels that gather by token. 32K tokens on an H200
# (bench/RESULTS.md, session 11; same-process A/B, two runs each): gate_up alone 16.07-16.10 ms
# a fwd+bwd step, both 16.23-16.24, neither 16.40. Traced: dW_gate + dW_up 3.02 -> ~2.1 ms for
# +0.44 ms in the gate-up kernel; dW_down 1.50 -> ~1.1 for +0.78 in the down backward's product
SORTED_WGRAD: tuple = ("gate_up",)


def _sorted_wgrad(x_TD, wg) -> bool:
    """Whether the fused backward's weight gradients may run as Mosaic GPU kernels on sorted
    rows (SORTED_WGRAD says which): rows that a Hopper TMA cannot gather, so the Triton kernels
    that gather them anyway write them out."""
    d, f = wg.shape[1], wg.shape[2]
    # a half tile's last TILE_M / 2 rows of gathered rows are never written: its steps must
    # end at the half
    steps_halve = (TILE_M // 2) % moe_mosaic.WGRAD.bk == 0
    return (
        DOWN_BWD_SPLIT
        and steps_halve
        and _mosaic("wgrad", x_TD, f)
        and moe_mosaic.fits("wgrad", d, f)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def _fused(tg, th, r0_G, r1_G, pos_TK, src_R, x_TD, weights_TK, wg, wu, wd, out_dtype):
    tok_R, w_R = _row_maps(pos_TK, src_R, weights_TK)
    (h,) = _gateup_gather(tg, tok_R, w_R, x_TD, wg, wu, residuals=False, th=th)
    return sum_rows(_fused_down(tg, th, h, wd), pos_TK, out_dtype)


def _fused_fwd(tg, th, r0_G, r1_G, pos_TK, src_R, x_TD, weights_TK, wg, wu, wd, out_dtype):
    tok_R, w_R = _row_maps(pos_TK, src_R, weights_TK)
    sort = _sorted_wgrad(x_TD, wg) and "gate_up" in SORTED_WGRAD
    h, g, u, *xs = _gateup_gather(tg, tok_R, w_R, x_TD, wg, wu, True, th=th, rows_out=sort)
    y_TD = sum_rows(_fused_down(tg, th, h, wd), pos_TK, out_dtype)
    xs_RD = xs[0] if sort else None
    res = (tg, th, r0_G, r1_G, pos_TK, tok_R, w_R, x_TD, weights_TK, wg, wu, wd, h, g, u, xs_RD)
    return y_TD, res


def _fused_bwd(out_dtype, res, gy_TD):
    tg, th, r0_G, r1_G, pos_TK, tok_R, w_R, x_TD, weights_TK, wg, wu, wd, h, g, u, xs_RD = res
    gy_TD = gy_TD.astype(x_TD.dtype)
    sort_d = _sorted_wgrad(x_TD, wg) and "down" in SORTED_WGRAD
    dg, du, gw_JR, *gys = _down_bwd_gather(tg, tok_R, w_R, gy_TD, wd, g, u, th=th, rows_out=sort_d)
    # dx: per-row products, then each token sums its K rows (the dispatch's transpose).
    if _mosaic("dx", dg, wg.shape[1]):
        dx_RD = moe_mosaic.dx(tg, dg, du, wg, wu, half_T=th)
    else:
        dx_RD = _dx(tg, dg, du, wg, wu, th)
    dx_TD = sum_rows(dx_RD, pos_TK, x_TD.dtype)
    # on sorted rows: the TMA-fed Mosaic kernel; else Triton's, reading one operand by token
    if sort_d:
        (dwd,) = moe_mosaic.grouped_weight_grad(r0_G, r1_G, h, gys, out_dtype=wd.dtype)
    else:
        (dwd,) = _tgmm(r0_G, r1_G, h, [gy_TD], wd.dtype, tok_R=tok_R, gather=(False, True))
    if xs_RD is not None:
        dwg, dwu = moe_mosaic.grouped_weight_grad(r0_G, r1_G, xs_RD, [dg, du], out_dtype=wg.dtype)
    else:
        dwg, dwu = _tgmm2(r0_G, r1_G, x_TD, dg, du, wg.dtype, tok_R=tok_R, gather=(True, False))
    gw_TK = _take(jnp.sum(gw_JR, axis=0), pos_TK).astype(weights_TK.dtype)
    return None, None, None, None, None, None, dx_TD, gw_TK, dwg, dwu, dwd


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_routed_swiglu(
    x_TD, weights_TK, pos_TK, src_R, sizes_G, start_G, w_gate_GDF, w_up_GDF, w_down_GFD
):
    """y[t] = sum_k weights[t, k] * SwiGLU_{group of slot (t, k)}(x[t]), without materialising the
    expert-sorted copy of x or of the output rows, forward or backward.

    x_TD [T, D] bf16/fp32; weights_TK [T, K] (fp32); pos_TK int32 [T, K] / src_R int32 [R] the
    placement of the T*K slots on the TILE_M-aligned layout (`moe_experts.row_layout('pallas')`,
    entry n = t*K + k; pos = R / src = T*K mean "not placed"), sizes_G, start_G int32 [G]; weights
    [G, D, F] / [G, F, D] in x's dtype. The K-way sum is fp32; returns [T, D] in x's dtype.

    Rows read x[src // K] through the row map inside the gate-up kernel and the dW_gate / dW_up
    kernel; the routing weight is applied in the gate-up epilogue (h = w * swiglu), so the output
    is a plain K-row sum and the backward reads the output cotangent by token inside the down
    backward kernel (which also yields dL/dw) and the dW_down kernel.
    """
    r = src_R.shape[0]
    if r % TILE_M:
        raise ValueError(f"rows {r} not a multiple of TILE_M={TILE_M}")
    tg, r0_G, r1_G = _tile_maps(sizes_G, start_G, r)
    return _fused(
        tg,
        _half_tiles(tg, r1_G),
        r0_G,
        r1_G,
        pos_TK,
        src_R,
        x_TD,
        weights_TK,
        w_gate_GDF,
        w_up_GDF,
        w_down_GFD,
        x_TD.dtype,
    )


# ----------------------------------------------------------------------------- fused router
# Tokens per router program and its warps: 4 rows x 512 experts fp32 in one warp's registers,
# so the k rounds of row reductions never cross warps (at 32K tokens, 512 experts on an H200 the
# forward kernel took 290 us with 16 rows / 8 warps, 243 with 8 / 2, 142 with 4 / 2, 118 with
# 4 rows / 1 warp)
ROUTER_ROWS = 4
ROUTER_WARPS = 1


def _router_kernel(logits_ref, probs_ref, w_ref, idx_ref, *v_ref, k, norm):
    """fp32 softmax over the experts, top-k by k rounds of argmax (ties to the lowest expert id,
    as lax.top_k), optional renormalisation; w / idx padded to a power-of-2 width with zeros.
    With norm, v_ref[0] gets the top-k probabilities before renormalisation (the backward's
    residual: w alone does not give their sum)."""
    z = logits_ref[...].astype(jnp.float32)
    ez = jnp.exp(z - jnp.max(z, axis=1)[:, None])
    p = ez / jnp.sum(ez, axis=1)[:, None]
    probs_ref[...] = p
    bm, e = p.shape
    col_E = jax.lax.broadcasted_iota(jnp.int32, (bm, e), 1)
    col_K = jax.lax.broadcasted_iota(jnp.int32, w_ref.shape, 1)
    w = jnp.zeros(w_ref.shape, jnp.float32)
    idx = jnp.zeros(w_ref.shape, jnp.int32)
    for j in range(k):
        v_j = jnp.max(p, axis=1)
        i_j = jnp.argmax(p, axis=1).astype(jnp.int32)
        w = jnp.where(col_K == j, v_j[:, None], w)
        idx = jnp.where(col_K == j, i_j[:, None], idx)
        p = jnp.where(col_E == i_j[:, None], -1.0, p)  # probabilities are >= 0: never again
    if norm:
        v_ref[0][...] = w
        w = w / jnp.sum(w, axis=1)[:, None]
    w_ref[...] = w
    idx_ref[...] = idx


def _router_call(logits_TE, k, norm):
    """The forward kernel; outputs padded to tp = T rounded up to ROUTER_ROWS rows and kp
    columns: w_pK [tp, kp], idx_pK [tp, kp], probs_pE [tp, E], v_pK [tp, kp] (the top-k
    probabilities before renormalisation; w_pK itself without norm)."""
    t, e = logits_TE.shape
    bm = ROUTER_ROWS
    tp = round_up(t, bm)
    kp = max(2, pl.next_power_of_2(k))
    z = jnp.pad(logits_TE, ((0, tp - t), (0, 0)))
    rows = pl.BlockSpec((bm, e), lambda i: (i, 0))
    small = pl.BlockSpec((bm, kp), lambda i: (i, 0))
    small_f32 = jax.ShapeDtypeStruct((tp, kp), jnp.float32)
    outs = _call(
        functools.partial(_router_kernel, k=k, norm=norm),
        (tp // bm,),
        [rows],
        [rows, small, small] + [small] * norm,
        [
            jax.ShapeDtypeStruct((tp, e), jnp.float32),
            small_f32,
            jax.ShapeDtypeStruct((tp, kp), jnp.int32),
        ]
        + [small_f32] * norm,
        bm * e * 4,
        ROUTER_WARPS,
    )(z)
    probs, w, idx = outs[:3]
    return w, idx, probs, outs[3] if norm else w


ROUTER_BWD = "pallas"  # router backward: the fused kernel, or "xla" (the bench times both)


def _router_bwd_kernel(*refs, k, norm, has_dprobs):
    """dlogits for ROUTER_ROWS tokens: the renormalisation's transpose on the [bm, kp] tiles, the
    top-k transpose as k masked selects over the [bm, E] tile (the ids of a row are distinct), the
    softmax transpose. refs: probs, idx, dw, [v if norm], [dprobs if has_dprobs], dz."""
    probs_ref, idx_ref, dw_ref = refs[:3]
    v_ref = refs[3] if norm else None
    dprobs_ref = refs[3 + norm] if has_dprobs else None
    dz_ref = refs[-1]
    p = probs_ref[...]
    idx = idx_ref[...]
    dv = dw_ref[...]  # padded columns hold dw = 0 (and are never scattered)
    if norm:  # w = v / s, s = sum_k v_k: dv_j = (dw_j - sum_k dw_k v_k / s) / s
        v = v_ref[...]
        s = jnp.sum(v, axis=1)[:, None]
        dv = (dv - jnp.sum(dv * v / s, axis=1)[:, None]) / s
    bm, e = p.shape
    col_E = jax.lax.broadcasted_iota(jnp.int32, (bm, e), 1)
    col_K = jax.lax.broadcasted_iota(jnp.int32, idx.shape, 1)
    dp = dprobs_ref[...] if has_dprobs else jnp.zeros((bm, e), jnp.float32)
    for j in range(k):  # columns >= k are padding: never read
        # Column j of the small tiles by a masked row sum (no value slicing in Triton).
        i_j = jnp.sum(jnp.where(col_K == j, idx, 0), axis=1)
        dv_j = jnp.sum(jnp.where(col_K == j, dv, 0.0), axis=1)
        dp = jnp.where(col_E == i_j[:, None], dp + dv_j[:, None], dp)
    dz_ref[...] = (p * (dp - jnp.sum(p * dp, axis=1)[:, None])).astype(dz_ref.dtype)


def _router_bwd_call(probs_pE, idx_pK, v_pK, dw_TK, dprobs_TE, k, norm, dtype):
    """The backward kernel on the forward's padded residuals (probs_pE [tp, E], idx_pK and v_pK
    [tp, kp]); dprobs_TE None = a zero cotangent (not read). Returns dlogits [T, E] in dtype."""
    tp, e = probs_pE.shape
    t = dw_TK.shape[0]
    bm, kp = ROUTER_ROWS, idx_pK.shape[1]
    dw = jnp.pad(dw_TK.astype(jnp.float32), ((0, tp - t), (0, kp - k)))
    rows = pl.BlockSpec((bm, e), lambda i: (i, 0))
    small = pl.BlockSpec((bm, kp), lambda i: (i, 0))
    args, specs = [probs_pE, idx_pK, dw], [rows, small, small]
    if norm:
        args.append(v_pK)
        specs.append(small)
    if dprobs_TE is not None:
        args.append(jnp.pad(dprobs_TE.astype(jnp.float32), ((0, tp - t), (0, 0))))
        specs.append(rows)
    dz = _call(
        functools.partial(_router_bwd_kernel, k=k, norm=norm, has_dprobs=dprobs_TE is not None),
        (tp // bm,),
        specs,
        rows,
        jax.ShapeDtypeStruct((tp, e), dtype),
        bm * e * 4,
        ROUTER_WARPS,
    )(*args)
    return dz[:t]


def _router_bwd_xla(idx_TK, probs_TE, dw_TK, dprobs_TE, norm):
    """The same backward as XLA ops (take_along_axis, scatter-add, softmax transpose)."""
    dv_TK = dw_TK.astype(jnp.float32)
    if norm:  # w = v / sum(v): dv_j = (dw_j - sum_k dw_k w_k) / sum(v)
        v_TK = jnp.take_along_axis(probs_TE, idx_TK, axis=1)
        s_T1 = jnp.sum(v_TK, axis=1, keepdims=True)
        dv_TK = (dv_TK - jnp.sum(dv_TK * v_TK / s_T1, axis=1, keepdims=True)) / s_T1
    rows_T1 = jnp.arange(idx_TK.shape[0])[:, None]
    dp_TE = dprobs_TE.astype(jnp.float32).at[rows_T1, idx_TK].add(dv_TK)  # as top_k's transpose
    return probs_TE * (dp_TE - jnp.sum(probs_TE * dp_TE, axis=1, keepdims=True))


def _router_fwd_padded(logits_TE, k, norm):
    """(w_TK, idx_TK, probs_TE) and the padded residuals (idx_pK, probs_pE, v_pK)."""
    w_pK, idx_pK, probs_pE, v_pK = _router_call(logits_TE, k, norm)
    t = logits_TE.shape[0]
    return (w_pK[:t, :k], idx_pK[:t, :k], probs_pE[:t]), (idx_pK, probs_pE, v_pK)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _router(logits_TE, k, norm, bwd):
    del bwd
    return _router_fwd_padded(logits_TE, k, norm)[0]


def _router_fwd(logits_TE, k, norm, bwd):
    del bwd
    z = logits_TE.value  # symbolic_zeros: primals come as CustomVJPPrimal(value, perturbed)
    out, res = _router_fwd_padded(z, k, norm)
    # Padded residuals: the kernel reads them as they are (no re-pad of the [T, E] probs).
    return out, (*res, z[:0, :0])


def _router_bwd(k, norm, bwd, res, cts):
    idx_pK, probs_pE, v_pK, z_empty = res
    dw_TK, _, dprobs_TE = cts
    # symbolic_zeros: a cotangent the loss does not reach is a SymbolicZero; a zero dprobs is
    # not read at all (a [T, E] zeros array would be one more pass), a zero dw is small.
    if isinstance(dprobs_TE, jax.custom_derivatives.SymbolicZero):
        dprobs_TE = None
    if isinstance(dw_TK, jax.custom_derivatives.SymbolicZero):
        dw_TK = jnp.zeros(dw_TK.aval.shape, jnp.float32)
    if bwd == "xla":
        t = dw_TK.shape[0]
        probs_TE = probs_pE[:t]
        dp_TE = jnp.zeros_like(probs_TE) if dprobs_TE is None else dprobs_TE
        dz = _router_bwd_xla(idx_pK[:t, :k], probs_TE, dw_TK, dp_TE, norm)
        return (dz.astype(z_empty.dtype),)
    dz = _router_bwd_call(probs_pE, idx_pK, v_pK, dw_TK, dprobs_TE, k, norm, z_empty.dtype)
    return (dz,)


_router.defvjp(_router_fwd, _router_bwd, symbolic_zeros=True)


def router_topk(logits_TE, k: int, norm_topk_prob: bool = True, bwd: str | None = None):
    """moe.router_topk in one Pallas kernel per ROUTER_ROWS tokens: fp32 softmax, top-k, optional
    renormalisation. logits_TE [T, E] with E a power of two (Triton block widths). Returns
    weights_TK float32, idx_TK int32, probs_TE float32. bwd: 'pallas' (one fused kernel for the
    top-k, renormalisation and softmax transposes) or 'xla'; None = ROUTER_BWD."""
    e = logits_TE.shape[1]
    if e & (e - 1) or k > e:
        raise ValueError(f"pallas router: {e} experts is not a power of two, or k={k} > E")
    bwd = ROUTER_BWD if bwd is None else bwd
    if bwd not in ("pallas", "xla"):
        raise ValueError(f"pallas router: bwd {bwd!r}: expected 'pallas' or 'xla'")
    return _router(logits_TE, k, norm_topk_prob, bwd)
