"""Grouped SwiGLU expert MLPs over rows already grouped by expert, one function per backend.

Each backend fixes how groups are laid out in the row buffer (`row_layout`) and computes
y[r] = (silu(x[r] @ w_gate[g]) * (x[r] @ w_up[g])) @ w_down[g] for every used row r of group g.
Rows outside every group may hold anything: callers never read them.

| backend    | layout                                   | rows R for N entries           |
|------------|------------------------------------------|--------------------------------|
| ragged_dot | groups back to back from row 0           | N                              |
| tokamax    | same                                     | N                              |
| padded     | group g owns rows [g*C, (g+1)*C)         | G*C (C = capacity, N dropless) |
| pallas     | each group starts on a tile boundary     | round_up(N + G*(tile-1), tile) |
| pallas_fused | same as pallas                         | same as pallas                 |
| megablox   | groups back to back from row 0           | round_up(N, 128 or 512)        |
| dense      | groups back to back; every expert on every row, masked (reference) | N   |

`padded` needs a static C: dropless it must be the worst case N (every entry to one group), G
times the useful work, so it is only sensible with a capacity factor. `pallas` is the dropless
GPU path: per-group padding to the kernel's row tile costs at most G*(tile-1) rows.
`megablox` is the dropless TPU path (Pallas TPU grouped matmul, `jax.experimental.pallas.ops.
tpu.megablox.gmm`, whose custom VJP computes weight gradients with `tgmm`): groups may start
mid-tile (the kernel masks), only the row count is padded to its row tile.
`pallas_fused` is the same kernels with the token gathers and the weighted combine fused into them
(`moe_pallas.fused_routed_swiglu`): `moe.routed_experts` calls it instead of dispatch +
grouped_swiglu + combine; `grouped_swiglu` on an explicit row buffer runs plain pallas.
`megablox_interpret` runs the same kernels in Pallas interpret mode on any platform (tests).
"""

import jax
import jax.numpy as jnp

from qwen3next_jax import sharding
from qwen3next_jax.ops import moe_pallas
from qwen3next_jax.ops.moe_dispatch import exclusive_cumsum, round_up

BACKENDS = (
    "ragged_dot",
    "tokamax",
    "padded",
    "pallas",
    "pallas_fused",
    "megablox",
    "megablox_interpret",
    "dense",
)
FUSED_BACKENDS = ("pallas_fused",)  # route x_TD -> y_TD in one op (fused_routed_swiglu)

MEGABLOX_MAX_TILE = 512  # rows / columns per megablox tile where the sizes allow


def _megablox_rows(num_entries: int) -> int:
    """Rows for megablox: a multiple of 512 (its row tile) when that wastes under a quarter,
    else of 128 (the TPU minimum)."""
    n = max(num_entries, 1)
    return round_up(n, MEGABLOX_MAX_TILE) if n >= 4 * MEGABLOX_MAX_TILE else round_up(n, 128)


def row_layout(backend: str, num_entries: int, num_groups: int, capacity: int | None):
    """Returns (num_rows, start_fn) for `place_by_group` under `backend`."""
    if backend in ("ragged_dot", "tokamax", "dense"):
        return num_entries, exclusive_cumsum
    if backend in ("megablox", "megablox_interpret"):
        return _megablox_rows(num_entries), exclusive_cumsum
    if backend == "padded":
        c = num_entries if capacity is None else min(capacity, num_entries)
        return num_groups * c, lambda sizes_G: jnp.arange(num_groups, dtype=jnp.int32) * c
    if backend in ("pallas", "pallas_fused"):
        tile = moe_pallas.TILE_M
        rows = round_up(num_entries + num_groups * (tile - 1), tile)
        return rows, lambda sizes_G: exclusive_cumsum(round_up(sizes_G, tile))
    raise ValueError(f"unknown MoE backend {backend!r}; expected one of {BACKENDS} or 'auto'")


def _dot(a, b, eq):
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def _swiglu_f32(g, u):
    return jax.nn.silu(g) * u


def _ragged(x_RD, sizes_G, w_gate_GDF, w_up_GDF, w_down_GFD, ragged_dot):
    def mm(a, w):
        return ragged_dot(a, w, sizes_G)

    h = _swiglu_f32(mm(x_RD, w_gate_GDF), mm(x_RD, w_up_GDF)).astype(x_RD.dtype)
    return mm(h, w_down_GFD).astype(x_RD.dtype)


def _lax_ragged_dot(a, w, sizes_G):
    return jax.lax.ragged_dot(a, w, sizes_G, preferred_element_type=jnp.float32)


def _tokamax_ragged_dot(a, w, sizes_G):
    try:
        import tokamax
    except ImportError as e:
        raise ImportError(
            "MoE backend 'tokamax' needs the tokamax package: pip install tokamax"
        ) from e
    # Output in the input dtype (kernels accumulate in fp32 inside); on GPU only the kernel
    # implementations: tokamax's XLA fallback is lax.ragged_dot, which densifies there.
    impl = ("mosaic", "triton") if sharding.target_platform() == "gpu" else None
    return tokamax.ragged_dot(a, w, sizes_G, implementation=impl)


def _megablox_tile(dim: int) -> int:
    """The largest of 512, 256, 128 dividing dim; dim itself (a whole-axis block, always a legal
    TPU block) when none does or dim is at most 512."""
    if dim <= MEGABLOX_MAX_TILE:
        return dim
    for t in (MEGABLOX_MAX_TILE, 256, 128):
        if dim % t == 0:
            return t
    return dim


def _megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """megablox's tiling lookup, called by gmm / tgmm with each product's own (m, k, n): the
    forward, the transposed backward and the weight-gradient kernels all get legal tiles."""
    return _megablox_tile(m), _megablox_tile(k), _megablox_tile(n)


def _megablox(x_RD, sizes_G, w_gate_GDF, w_up_GDF, w_down_GFD, interpret: bool):
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    # gmm assumes the groups cover all rows (its last group offset is the row count): the last
    # group takes the trailing padding rows. Nobody reads their outputs, so their cotangents are
    # zero and they add nothing to the weight gradients; they sit in that group's last, partly
    # used tile, which is computed anyway.
    rows = x_RD.shape[0]
    sizes_G = sizes_G.astype(jnp.int32)
    sizes_G = sizes_G.at[-1].add(rows - jnp.sum(sizes_G))

    def mm(a, w):
        # Positional: gmm is a custom_vjp whose static arguments are given by position.
        return gmm(a, w, sizes_G, a.dtype, _megablox_tiling, None, None, False, interpret)

    # Outputs in x's dtype (fp32 accumulation inside), so every backward product stays in x's
    # dtype on the MXU; g and u are therefore rounded to x's dtype before the SwiGLU.
    g, u = mm(x_RD, w_gate_GDF), mm(x_RD, w_up_GDF)
    h = _swiglu_f32(g.astype(jnp.float32), u.astype(jnp.float32)).astype(x_RD.dtype)
    return mm(h, w_down_GFD)


def _padded(x_RD, w_gate_GDF, w_up_GDF, w_down_GFD):
    g = w_gate_GDF.shape[0]
    x_GCD = x_RD.reshape(g, -1, x_RD.shape[-1])
    h = _swiglu_f32(_dot(x_GCD, w_gate_GDF, "gcd,gdf->gcf"), _dot(x_GCD, w_up_GDF, "gcd,gdf->gcf"))
    y_GCD = _dot(h.astype(x_RD.dtype), w_down_GFD, "gcf,gfd->gcd")
    return y_GCD.reshape(x_RD.shape).astype(x_RD.dtype)


def _dense(x_RD, sizes_G, start_G, w_gate_GDF, w_up_GDF, w_down_GFD):
    num_groups = sizes_G.shape[0]
    rows = jnp.arange(x_RD.shape[0], dtype=jnp.int32)
    gid_R = jnp.searchsorted(start_G + sizes_G, rows, side="right", method="scan")
    h = _swiglu_f32(_dot(x_RD, w_gate_GDF, "rd,gdf->grf"), _dot(x_RD, w_up_GDF, "rd,gdf->grf"))
    y_GRD = _dot(h.astype(x_RD.dtype), w_down_GFD, "grf,gfd->grd")
    mask_GR = gid_R[None, :] == jnp.arange(num_groups)[:, None]
    return jnp.einsum("gr,grd->rd", mask_GR.astype(jnp.float32), y_GRD).astype(x_RD.dtype)


def grouped_swiglu(
    x_RD: jax.Array,
    sizes_G: jax.Array,
    start_G: jax.Array,
    w_gate_GDF: jax.Array,
    w_up_GDF: jax.Array,
    w_down_GFD: jax.Array,
    *,
    backend: str,
) -> jax.Array:
    """SwiGLU of each row with its group's weights; rows laid out by `row_layout(backend, ...)`.

    x_RD [R, D] bf16/fp32; sizes_G, start_G int32 [G]; weights [G, D, F] / [G, F, D] cast to x's
    dtype. Matmuls accumulate in fp32. Returns [R, D] in x's dtype.
    """
    dt = x_RD.dtype
    wg, wu, wd = (w.astype(dt) for w in (w_gate_GDF, w_up_GDF, w_down_GFD))
    if backend == "ragged_dot":
        return _ragged(x_RD, sizes_G, wg, wu, wd, _lax_ragged_dot)
    if backend == "tokamax":
        return _ragged(x_RD, sizes_G, wg, wu, wd, _tokamax_ragged_dot)
    if backend == "padded":
        return _padded(x_RD, wg, wu, wd)
    if backend in ("pallas", "pallas_fused"):
        return moe_pallas.tiled_swiglu(x_RD, sizes_G, start_G, wg, wu, wd)
    if backend in ("megablox", "megablox_interpret"):
        return _megablox(x_RD, sizes_G, wg, wu, wd, interpret=backend == "megablox_interpret")
    if backend == "dense":
        return _dense(x_RD, sizes_G, start_G, wg, wu, wd)
    raise ValueError(f"unknown MoE backend {backend!r}; expected one of {BACKENDS} or 'auto'")


def fused_routed_swiglu(
    x_TD, weights_TK, pos_TK, src_R, sizes_G, start_G, w_gate_GDF, w_up_GDF, w_down_GFD, *, backend
):
    """sum_k weights[t, k] * SwiGLU_{group of slot (t, k)}(x[t]) for a backend in FUSED_BACKENDS:
    gather, grouped SwiGLU and weighted combine in one op. pos_TK / src_R place the T*K slots as
    `row_layout(backend, ...)` lays them out. Weights cast to x's dtype; returns [T, D] x dtype."""
    if backend != "pallas_fused":
        raise ValueError(f"MoE backend {backend!r} has no fused routed path")
    dt = x_TD.dtype
    wg, wu, wd = (w.astype(dt) for w in (w_gate_GDF, w_up_GDF, w_down_GFD))
    return moe_pallas.fused_routed_swiglu(
        x_TD, weights_TK, pos_TK, src_R, sizes_G, start_G, wg, wu, wd
    )
