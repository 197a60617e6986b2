"""Row-tile grouped matmuls as Mosaic GPU kernels (Hopper: TMA loads, wgmma, warp-specialised).

The same product as `moe_pallas`'s row kernels on its tile-aligned layout (every TILE_M = 128-row
tile belongs to one expert, `tile_group[t]`, or is unused, -1):

    out[r, :] = sum_p a_p[r, :] @ b_p[tile_group[r // 128]]        (fp32 accumulation)

with b_p [G, K, N], or [G, N, K] and `transpose_b` (dx reads the gate / up weights [G, D, F] as
their transposes). The forward down product is p = 1 (h, Wd); dx is p = 2 ((dg, Wg^T), (du,
Wu^T)). Rows are read by TMA, so there is no row gather here: the gathering kernels (gate-up,
the down backward, the weight gradients) stay Triton.

One CTA per SM loops over [128, 2 * bn] output tiles (persistent, `nd_loop`): a producer
warpgroup issues the TMA loads `steps` deep, two consumer warpgroups each own bn columns and issue
the wgmma, and each stores its [128, bn] result through shared memory in [64, epi_n] pieces, two
in flight, while the producer already loads the next tile. On an H200 at 32K tokens: the forward
down product 1.51-1.59 ms against Triton's 1.71-1.83, dx 2.95 against 3.29-3.37 (cuBLAS on the
same work with one weight: 1.2 and 2.3-2.4; bench/RESULTS.md, session 9).

Rows of unused tiles are left unwritten (nothing reads them: the K-row sums read placed rows
only). Hopper only (wgmma): `supported()` says whether the platform has it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

TILE_M = 128
NUM_SMS_DEFAULT = 132  # H100 SXM / H200


@dataclasses.dataclass(frozen=True)
class Config:
    """bn: output columns per consumer warpgroup (a CTA covers 2 * bn); bk: contraction step;
    steps: TMA stages in flight; epi_n: columns per stored piece; delay_release: wgmma groups
    left in flight when a consumer hands a stage back (0 or 1)."""

    bn: int = 128
    bk: int = 64
    steps: int = 4
    epi_n: int = 64
    delay_release: int = 0


# 32K tokens on an H200 (bench/mgpu_probe.py, session 9): down 1.51-1.59 ms (Triton 1.77-1.79);
# dx 2.95 ms with 2 stages of 64 deep and no wgmma left in flight (Triton 3.37; with
# delay_release=1 3.68, 32-deep steps 4.75-4.94)
DOWN = Config()
DX = Config(bk=64, steps=2)


def fits(name: str, n: int, k: int) -> bool:
    """Whether kernel `name` ("down" / "dx") tiles N output columns and a K-deep contraction."""
    cfg = {"down": DOWN, "dx": DX}[name]
    return n % (2 * cfg.bn) == 0 and k % cfg.bk == 0


def supported() -> bool:
    """Whether the default backend is a GPU with wgmma (compute capability 9.x)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    cc = getattr(dev, "compute_capability", "")
    return dev.platform == "gpu" and str(cc).startswith("9")


EPI_M = 64  # rows per stored piece of a tile


def smem_transforms(cols: int, dtype):
    """Tiling and swizzle of a shared-memory tile whose minor dimension holds `cols` elements
    (the widest swizzle, up to 128 bytes, that the row allows; wgmma and TMA read it so)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    item = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * item * 8)
    return plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle)


def store_tile(acc, out_smem, o_ref, epi_n: int):
    """Stores acc [rows, cols] (in o_ref's dtype) to the gmem ref o_ref of the same shape through
    the two [EPI_M, epi_n] shared-memory slots of out_smem, two TMA stores in flight; waits for
    the slots' previous stores first (one consumer warpgroup's part of an epilogue)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows, cols = acc.shape
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for i in range(rows // EPI_M):
        for j in range(cols // epi_n):
            slot = (i * (cols // epi_n) + j) % 2
            piece = (slice(i * EPI_M, (i + 1) * EPI_M), slice(j * epi_n, (j + 1) * epi_n))
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out_smem[slot] = acc[piece]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[slot], o_ref.at[piece])


def grouped_rows_matmul(
    tile_group_T,
    a_list,
    b_list,
    *,
    half_T=None,
    transpose_b: bool = False,
    config: Config = DOWN,
    num_sms: int | None = None,
    interpret: bool = False,
):
    """[R, N] in a's dtype: sum_p a_p rows of tile t times b_p[tile_group[t]] (see module doc).

    tile_group_T int [R / 128]; a_p [R, K]; b_p [G, K, N] ([G, N, K] with transpose_b), all in
    one 16-bit dtype. R a multiple of 128, N of 2 * bn, K of bk. half_T int [R / 128] (optional):
    where nonzero, only the tile's first 64 rows are multiplied and its last 64 are stored as
    zeros (a group's last tile with at most 64 used rows: `moe_pallas._half_tiles`). interpret:
    run in Pallas's GPU interpret mode on any host (tests; two simulated SMs unless num_sms; JAX
    0.10.2's interpreter has no transposed operands, so not with transpose_b there)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cfg = config
    p = len(a_list)
    r, k = a_list[0].shape
    n = b_list[0].shape[1 if transpose_b else 2]
    dt = a_list[0].dtype
    cta_n = 2 * cfg.bn
    for name, dim, blk in (("rows", r, TILE_M), ("N", n, cta_n), ("K", k, cfg.bk)):
        if dim % blk:
            raise ValueError(f"moe_mosaic: {name} = {dim} is not a multiple of {blk}")
    if cfg.bn % cfg.epi_n:
        raise ValueError(f"moe_mosaic: epi_n {cfg.epi_n} does not divide bn {cfg.bn}")
    m_iters, n_iters = r // TILE_M, n // cta_n
    item = jnp.dtype(dt).itemsize
    in_tf = smem_transforms(cfg.bk, dt)
    # B's minor dimension is K when transposed, else N (a 128-byte swizzle when it allows)
    b_tf = in_tf if transpose_b else smem_transforms(min(cta_n, 128 // item), dt)
    b_block = (cta_n, cfg.bk) if transpose_b else (cfg.bk, cta_n)
    b_index = (lambda s: (0, s)) if transpose_b else (lambda s: (s, 0))

    def spec(block, index, tf):
        return plgpu.BlockSpec(
            block,
            index,
            transforms=tf,
            memory_space=plgpu.SMEM,
            delay_release=cfg.delay_release,
        )

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // cfg.bk,),
            memory_registers=40,
            in_specs=[spec((TILE_M, cfg.bk), lambda s: (0, s), in_tf)] * p
            + [spec(b_block, b_index, b_tf)] * p,
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.steps,
            compute_context=compute_context,
        )

    def b_tile(b_gmem, e, cols):
        return b_gmem.at[e].at[cols, :] if transpose_b else b_gmem.at[e].at[:, cols]

    def body(tg_gmem, th_gmem, *refs):
        a_gmems, b_gmems, o_gmem = refs[:p], refs[p : 2 * p], refs[2 * p]
        unused = lambda *_, **__: None  # noqa: E731 - allocations do not depend on the bodies
        allocs = pipeline(unused, unused).get_allocations(
            *a_gmems, *(b_tile(b, 0, pl.ds(0, cta_n)) for b in b_gmems)
        )

        @functools.partial(
            pl.run_scoped,
            allocs=allocs,
            out_smem=plgpu.SMEM(
                (2, 2, EPI_M, cfg.epi_n), dt, transforms=smem_transforms(cfg.epi_n, dt)
            ),
            collective_axes="wg",
        )
        def _scope(allocs, out_smem):
            wg = jax.lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
            def _tiles(info):
                mi, ni = plgpu.planar_snake(info.index[0], (m_iters, n_iters), 1, 1)
                e, half = tg_gmem[mi], th_gmem[mi]
                rows = pl.ds(mi * TILE_M, TILE_M)
                cols = pl.ds(ni * cta_n, cta_n)
                wg_cols = pl.ds(wg * cfg.bn, cfg.bn)

                def compute_context(run):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((TILE_M, cfg.bn)))
                    def _acc(acc_ref):
                        run(acc_ref)
                        store_tile(
                            acc_ref[...].astype(dt),
                            out_smem.at[wg],
                            o_gmem.at[rows, cols].at[:, wg_cols],
                            cfg.epi_n,
                        )

                def mma(_, *smems):
                    acc_ref = smems[-1]

                    def products(n):
                        for a_smem, b_smem in zip(smems[:p], smems[p : 2 * p], strict=True):
                            if transpose_b:
                                b = plgpu.transpose_ref(b_smem.at[wg_cols, :], (1, 0))
                            else:
                                b = b_smem.at[:, wg_cols]
                            if n == TILE_M:
                                plgpu.wgmma(acc_ref, a_smem, b)
                            else:  # the accumulator's other rows stay 0
                                plgpu.wgmma(acc_ref.at[:n], a_smem.at[:n], b)

                    if half_T is None:
                        products(TILE_M)
                    else:
                        pl.when(half == 0)(lambda: products(TILE_M))
                        pl.when(half != 0)(lambda: products(TILE_M // 2))
                    plgpu.wgmma_wait(cfg.delay_release)
                    return acc_ref

                @pl.when(e >= 0)
                def _():
                    e_safe = jnp.maximum(e, 0)
                    pipeline(mma, compute_context)(
                        *(a.at[rows, :] for a in a_gmems),
                        *(b_tile(b, e_safe, cols) for b in b_gmems),
                        allocations=allocs,
                    )

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((r, n), dt),
        grid=(num_sms or (2 if interpret else _num_sms()),),
        grid_names=("cluster_grid",),
        cluster=(1,),
        cluster_names=("cluster",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": _interpret_params()} if interpret else {}),
    )
    tg = tile_group_T.astype(jnp.int32)
    th = jnp.zeros_like(tg) if half_T is None else half_T.astype(jnp.int32)
    return kernel(tg, th, *a_list, *b_list)


def _interpret_params():
    """Pallas's GPU interpret mode (runs the kernel on a CPU, simulating shared memory, TMA and
    barriers; public as plgpu.InterpretGPUParams from JAX 0.11)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:  # JAX 0.10
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or NUM_SMS_DEFAULT
    except RuntimeError:
        return NUM_SMS_DEFAULT


def down(tile_group_T, h_RF, w_down_GFD, half_T=None, config: Config | None = None, **kw):
    """y [R, D] = h rows @ Wd[expert of the row's tile]. kw: grouped_rows_matmul's options."""
    return grouped_rows_matmul(
        tile_group_T, [h_RF], [w_down_GFD], half_T=half_T, config=config or DOWN, **kw
    )


def dx(tile_group_T, dg_RF, du_RF, w_gate_GDF, w_up_GDF, half_T=None, config=None, **kw):
    """dx [R, D] = dg @ Wg[e]^T + du @ Wu[e]^T per row tile. kw: grouped_rows_matmul's options."""
    return grouped_rows_matmul(
        tile_group_T,
        [dg_RF, du_RF],
        [w_gate_GDF, w_up_GDF],
        half_T=half_T,
        transpose_b=True,
        config=config or DX,
        **kw,
    )
