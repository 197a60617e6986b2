"""MoE grouped matmuls as Mosaic GPU kernels (Hopper: TMA loads, wgmma, warp-specialised).

The same product as `moe_pallas`'s row kernels on its tile-aligned layout (every TILE_M = 128-row
tile belongs to one expert, `tile_group[t]`, or is unused, -1):

    out[r, :] = sum_p a_p[r, :] @ b_p[tile_group[r // 128]]        (fp32 accumulation)

with b_p [G, K, N], or [G, N, K] and `transpose_b` (dx reads the gate / up weights [G, D, F] as
their transposes). The forward down product is p = 1 (h, Wd); dx is p = 2 ((dg, Wg^T), (du,
Wu^T)). Rows are read by TMA, so there is no row gather here: the gathering kernels (gate-up,
the down backward's product) stay Triton, and a program of theirs per row block copies the
gathered rows out for the weight gradients.

`grouped_weight_grad` is the weight gradients' product on the same layout, out[g] = a_g^T b_g
over each group's rows (dWg, dWu from the sorted x rows and dg, du; dWd from h and the sorted
cotangent rows), in the same warp-specialised, ping-pong form.

One CTA per SM walks its share of the [128, bn] output tiles (persistent). A producer warpgroup
issues the TMA loads of every tile's contraction steps into one ring of `stages` shared-memory
stages, never drained between tiles; two consumer warpgroups take alternate tiles ("ping-pong"):
one issues its tile's wgmma while the other stores its finished tile through shared memory in
[64, epi_n] pieces. On an H200 at 32K tokens (bench/mgpu_probe.py; bench/RESULTS.md, session
10): the forward down product 1.20-1.26 ms and dx 2.45-2.55, against Triton's 1.78 and 3.33 and
cuBLAS's 1.17-1.23 and 2.36 on the same work with one weight; session 9's form (both consumers
on halves of one [128, 256] tile, the stages drained at every tile end) took 1.57 and 3.04.

Rows of unused tiles are left unwritten (nothing reads them: the K-row sums read placed rows
only). Hopper only (wgmma): `supported()` says whether the platform has it. JAX 0.10.2's Pallas
interpreter models no transposed operand, so on a CPU only the down kernel and, with its
operand's transpose swapped out, the weight-gradient pipeline run (tests/test_moe_mosaic.py).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

TILE_M = 128
NUM_SMS_DEFAULT = 132  # H100 SXM / H200


@dataclasses.dataclass(frozen=True)
class Config:
    """bn: output columns of a tile (one consumer warpgroup's [128, bn] fp32 accumulator); bk:
    contraction step; stages: shared-memory stages of the load ring; epi_n: columns per stored
    piece; delay: wgmma groups left in flight when a consumer hands a stage back (0 or 1)."""

    bn: int = 128
    bk: int = 64
    stages: int = 4
    epi_n: int = 64
    delay: int = 1

    def __post_init__(self):
        if self.bn % self.epi_n or self.delay not in (0, 1):
            raise ValueError(
                f"moe_mosaic: epi_n {self.epi_n} must divide bn {self.bn}, delay be 0 or 1"
            )


# 32K tokens on an H200 (bench/mgpu_probe.py, session 10; two runs): down 1.20-1.26 ms with 5
# stages and one wgmma group left in flight (4 stages 1.29-1.30, 3 1.60; none in flight 1.37);
# dx 2.45 with 4 stages and one in flight, 2.54-2.55 with 5, 2.74 with 6 (none in flight:
# 2.73-2.88 for 4-6 stages). The layer agreed (fwd+bwd, one run): 16.69 ms with this dx, 17.02
# with 5 stages, 16.99 with none in flight
DOWN = Config(stages=5)
DX = Config()


def fits(name: str, n: int, k: int) -> bool:
    """Whether kernel `name` ("down" / "dx") tiles N output columns and a K-deep contraction;
    for "wgrad", whether it tiles [K, N] weight gradients (K = a's columns)."""
    if name == "wgrad":
        return n % WGRAD.bn == 0 and k % TILE_M == 0
    cfg = {"down": DOWN, "dx": DX}[name]
    return n % cfg.bn == 0 and k % cfg.bk == 0


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
    the slots' previous stores first (one consumer warpgroup's epilogue)."""
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


def _ring_scope(cfg: Config, a_tile, b_tile, dt, out_dt):
    """pl.run_scoped over the kernels' shared memory and barriers: `stages` a and b tiles (each
    given as (shape, minor columns for the swizzle)), the two consumers' two [EPI_M, epi_n] store
    slots in out_dt, and the ring's barriers."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def smem(tile, dtype):
        shape, cols = tile
        return plgpu.SMEM((cfg.stages, *shape), dtype, transforms=smem_transforms(cols, dtype))

    return functools.partial(
        pl.run_scoped,
        a_smem=smem(a_tile, dt),
        b_smem=smem(b_tile, dt),
        out_smem=plgpu.SMEM(
            (2, 2, EPI_M, cfg.epi_n), out_dt, transforms=smem_transforms(cfg.epi_n, out_dt)
        ),
        # per consumer and stage (_claim_stage), filled by two TMA loads
        produced=plgpu.Barrier(num_arrivals=2, num_barriers=2 * cfg.stages),
        consumed=plgpu.Barrier(num_arrivals=1, num_barriers=cfg.stages),
        collective_axes="wg",
    )


def _claim_stage(produced, consumed, step, consumer, stages: int):
    """The producer's claim of ring step `step` for consumer 0 / 1: its stage s = step % stages,
    once that stage's previous contents are consumed (a stage's first fill waits for nobody),
    and the barrier its loads arrive on (each consumer has its own: a refill for the other one
    must not complete the waiting one's phase). Returns (s, barrier)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    s = step % stages
    pl.when(step >= stages)(functools.partial(plgpu.barrier_wait, consumed.at[s]))
    return s, produced.at[consumer * stages + s]


def _persistent_kernel(body, out_type, nsm: int, interpret: bool):
    """plgpu.kernel over one CTA per SM (`nsm` of them) of three warpgroups (two consumers, one
    producer) with warpgroup lowering; Pallas's GPU interpret mode with `interpret`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(nsm,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": _interpret_params()} if interpret else {}),
    )


def _await_last_consumption(consumed, steps, stages: int):
    """The producer's last waits: every filled stage's final consumption (of `steps` steps in
    all), so that no barrier is left mid-phase when the CTA exits."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    for s in range(stages):
        pl.when(steps > s)(functools.partial(plgpu.barrier_wait, consumed.at[s]))


def _consume_stage(produced, consumed, consumer, step, j, stages: int, delay: int, issue):
    """A consumer's ring step `step` (the j-th of its unit; j static or traced): wait for the
    stage's loads, issue(s) its wgmma, keep `delay` wgmma groups in flight, and hand the stage
    whose wgmma has finished back to the producer (the wait in _claim_stage)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    s = step % stages
    plgpu.barrier_wait(produced.at[consumer * stages + s])
    issue(s)
    plgpu.wgmma_wait(delay)
    pl.when(j >= delay)(
        functools.partial(plgpu.barrier_arrive, consumed.at[(step - delay) % stages])
    )


def _release_unit_end(consumed, end, steps, stages: int, delay: int):
    """After a unit's `steps` steps (ring steps up to `end`, exclusive): the wgmma group still in
    flight finishes and its stage goes back to the producer."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if delay:
        plgpu.wgmma_wait(0)
        pl.when(steps > 0)(functools.partial(plgpu.barrier_arrive, consumed.at[(end - 1) % stages]))


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
    one 16-bit dtype. R a multiple of 128, N of bn, K of bk. half_T int [R / 128] (optional):
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
    for name, dim, blk in (("rows", r, TILE_M), ("N", n, cfg.bn), ("K", k, cfg.bk)):
        if dim % blk:
            raise ValueError(f"moe_mosaic: {name} = {dim} is not a multiple of {blk}")
    k_steps = k // cfg.bk
    total = p * k_steps  # contraction steps of one tile, over the p products
    n_iters = n // cfg.bn
    n_tiles = (r // TILE_M) * n_iters
    nsm = num_sms or (2 if interpret else _num_sms())
    item = jnp.dtype(dt).itemsize
    b_block = (cfg.bn, cfg.bk) if transpose_b else (cfg.bk, cfg.bn)
    # B's minor dimension is K when transposed, else N (a 128-byte swizzle when it allows)
    b_cols = cfg.bk if transpose_b else min(cfg.bn, 128 // item)

    def body(tg_gmem, th_gmem, *refs):
        a_gmems, b_gmems, o_gmem = refs[:p], refs[p : 2 * p], refs[2 * p]
        stages = cfg.stages

        @_ring_scope(cfg, ((TILE_M, cfg.bk), cfg.bk), (b_block, b_cols), dt, dt)
        def _scope(a_smem, b_smem, out_smem, produced, consumed):
            wg = jax.lax.axis_index("wg")
            sm = jax.lax.axis_index("sm")
            n_local = (n_tiles - sm + nsm - 1) // nsm  # this CTA's tiles: sm, sm + nsm, ...

            def tile(i):
                t = sm + i * nsm
                mi = t // n_iters
                return mi, t % n_iters, tg_gmem[mi], th_gmem[mi]

            # The ring position runs on over tiles: the step count `base` (steps of used tiles
            # before this one) places step j in stage (base + j) % stages. All three warpgroups
            # must count it alike, hence one function.
            def next_base(base, e):
                return base + jnp.where(e >= 0, total, 0)

            @pl.when(wg == 2)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")

                def loop(i, base):
                    mi, ni, e, _ = tile(i)
                    e_safe = jnp.maximum(e, 0)

                    @pl.when(e >= 0)
                    def _():
                        for j in range(total):
                            q, kk = divmod(j, k_steps)
                            s, bar = _claim_stage(produced, consumed, base + j, i % 2, stages)
                            ks, cols = pl.ds(kk * cfg.bk, cfg.bk), pl.ds(ni * cfg.bn, cfg.bn)
                            a_src = a_gmems[q].at[pl.ds(mi * TILE_M, TILE_M), ks]
                            b_src = b_gmems[q].at[e_safe]
                            b_src = b_src.at[cols, ks] if transpose_b else b_src.at[ks, cols]
                            plgpu.copy_gmem_to_smem(a_src, a_smem.at[s], bar)
                            plgpu.copy_gmem_to_smem(b_src, b_smem.at[s], bar)

                    return next_base(base, e)

                steps = jax.lax.fori_loop(0, n_local, loop, jnp.int32(0))
                _await_last_consumption(consumed, steps, stages)

            @pl.when(wg < 2)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")

                def mma(acc_ref, base, half):
                    def issue(s):
                        a, b = a_smem.at[s], b_smem.at[s]
                        if transpose_b:
                            b = plgpu.transpose_ref(b, (1, 0))
                        if half_T is None:
                            plgpu.wgmma(acc_ref, a, b)
                        else:  # a half tile's last 64 accumulator rows stay 0
                            pl.when(half == 0)(functools.partial(plgpu.wgmma, acc_ref, a, b))
                            pl.when(half != 0)(
                                functools.partial(
                                    plgpu.wgmma, acc_ref.at[: TILE_M // 2], a.at[: TILE_M // 2], b
                                )
                            )

                    for j in range(total):
                        _consume_stage(
                            produced, consumed, wg, base + j, j, stages, cfg.delay, issue
                        )
                    _release_unit_end(consumed, base + total, total, stages, cfg.delay)
                    return acc_ref[...]

                def loop(i, base):
                    mi, ni, e, half = tile(i)

                    @pl.when((i % 2 == wg) & (e >= 0))
                    def _():
                        acc = pl.run_scoped(
                            functools.partial(mma, base=base, half=half),
                            plgpu.ACC((TILE_M, cfg.bn)),
                        )
                        store_tile(
                            acc.astype(dt),
                            out_smem.at[wg],
                            o_gmem.at[pl.ds(mi * TILE_M, TILE_M), pl.ds(ni * cfg.bn, cfg.bn)],
                            cfg.epi_n,
                        )

                    return next_base(base, e)

                jax.lax.fori_loop(0, n_local, loop, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = _persistent_kernel(body, jax.ShapeDtypeStruct((r, n), dt), nsm, interpret)
    tg = tile_group_T.astype(jnp.int32)
    th = jnp.zeros_like(tg) if half_T is None else half_T.astype(jnp.int32)
    return kernel(tg, th, *a_list, *b_list)


def weight_grad_reference(row0_G, row1_G, a_RA, b_list, *, out_dtype=None, **_):
    """grouped_weight_grad in plain JAX (fp32, exact group rows; a [R, G] mask, for tests).
    Rows outside every group are never read (they may hold anything, NaN included)."""
    rows_R1 = jnp.arange(a_RA.shape[0])[:, None]
    in_RG = (rows_R1 >= row0_G[None]) & (rows_R1 < row1_G[None])
    read_R1 = jnp.any(in_RG, axis=1, keepdims=True)
    a = jnp.where(read_R1, a_RA.astype(jnp.float32), 0.0)
    hi = jax.lax.Precision.HIGHEST
    return tuple(
        jnp.einsum(
            "rg,ra,rn->gan",
            in_RG.astype(jnp.float32),
            a,
            jnp.where(read_R1, b.astype(jnp.float32), 0.0),
            precision=hi,
        ).astype(out_dtype or a_RA.dtype)
        for b in b_list
    )


def _lhs_transposed(ref):
    """The [bk, 128] shared-memory tile of a as wgmma's [128, bk] left operand (a module
    function so that a test can swap it: JAX 0.10.2's interpreter models no transposed
    operands)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.transpose_ref(ref, (1, 0))


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


# The weight gradients: units of ~10 steps of 64 rows (~640 rows an expert at 32K tokens). 32K
# tokens on an H200 (bench/mgpu_probe.py, session 11): dW_gate + dW_up 2.15 ms with 4 stages and
# one wgmma group in flight (5 stages 2.27, 3 2.84, none in flight 2.52; Triton 3.25-3.31,
# cuBLAS batched over equal groups 2.46); dW_down 1.16 (5 stages 1.12; Triton 1.52-1.63)
WGRAD = Config()


def grouped_weight_grad(
    row0_G,
    row1_G,
    a_RA,
    b_list,
    *,
    out_dtype=None,
    config: Config | None = None,
    num_sms: int | None = None,
    interpret: bool = False,
):
    """Per-group a^T b: out_p[g] = a[r0:r1]^T @ b_p[r0:r1] over group g's rows [row0, row1).

    a_RA [R, A]; b_p [R, N] (one or two, sharing a's tiles); all in one 16-bit dtype. row0_G
    int [G] multiples of config.bk with row1 >= row0, and every row up to row1 rounded up to bk
    inside the arrays: the last step reads past row1, so those rows must add nothing (a or b zero
    there, as the tile-aligned layout's padding). A and N multiples of 128 and config.bn. Returns
    [G, A, N] per b, in out_dtype (default a's), fp32-accumulated; an empty group gives zeros.

    A unit is one [128, bn] tile of one group's output; units run in (group, a-tile, b, n-tile)
    order, so the SMs share one group's rows in L2. Each step is a wgmma of a's [bk, 128] tile
    read transposed (wgmma's MN-major operand) against b's [bk, bn] tile. The rows are viewed
    as [R / bk, bk, .] blocks and a step's block picked by an integer index: a TMA slice whose
    start is a scalar loaded from memory fails Mosaic GPU's layout inference (JAX 0.10.2)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cfg = config or WGRAD
    p = len(b_list)
    r, a_cols = a_RA.shape
    n = b_list[0].shape[1]
    g = row0_G.shape[0]
    dt = a_RA.dtype
    out_dt = jnp.dtype(out_dtype or dt)
    for name, dim, blk in (("A", a_cols, TILE_M), ("N", n, cfg.bn), ("rows", r, cfg.bk)):
        if dim % blk:
            raise ValueError(f"moe_mosaic: {name} = {dim} is not a multiple of {blk}")
    n_tiles = n // cfg.bn
    per_a = p * n_tiles  # units of one a-tile
    per_g = (a_cols // TILE_M) * per_a
    n_units = g * per_g
    nsm = num_sms or (2 if interpret else _num_sms())
    b_swz = min(cfg.bn, 128 // jnp.dtype(dt).itemsize)

    def body(first_gmem, steps_gmem, a_gmem, *refs):
        b_gmems, o_gmems = refs[:p], refs[p:]
        stages = cfg.stages

        @_ring_scope(cfg, ((cfg.bk, TILE_M), TILE_M), ((cfg.bk, cfg.bn), b_swz), dt, out_dt)
        def _scope(a_smem, b_smem, out_smem, produced, consumed):
            wg = jax.lax.axis_index("wg")
            sm = jax.lax.axis_index("sm")
            n_local = (n_units - sm + nsm - 1) // nsm

            def unit(i):
                """(group, a-tile, b index, n-tile, first row block, steps) of unit i."""
                u = sm + i * nsm
                e, rem = u // per_g, u % per_g
                q = (rem % per_a) // n_tiles
                return e, rem // per_a, q, rem % n_tiles, first_gmem[e], steps_gmem[e]

            @pl.when(wg == 2)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")

                def loop(i, base):
                    _, ia, q, ni, blk0, steps = unit(i)

                    def step(j, carry):
                        s, bar = _claim_stage(produced, consumed, base + j, i % 2, stages)
                        blk = blk0 + j
                        a_src = a_gmem.at[blk, :, pl.ds(ia * TILE_M, TILE_M)]
                        plgpu.copy_gmem_to_smem(a_src, a_smem.at[s], bar)
                        for qq in range(p):  # b's source is chosen at run time
                            b_src = b_gmems[qq].at[blk, :, pl.ds(ni * cfg.bn, cfg.bn)]
                            pl.when(q == qq)(
                                functools.partial(plgpu.copy_gmem_to_smem, b_src, b_smem.at[s], bar)
                            )
                        return carry

                    jax.lax.fori_loop(0, steps, step, None)
                    return base + steps

                used = jax.lax.fori_loop(0, n_local, loop, jnp.int32(0))
                _await_last_consumption(consumed, used, stages)

            @pl.when(wg < 2)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")

                def mma(acc_ref, base, steps):
                    def issue(s):
                        plgpu.wgmma(acc_ref, _lhs_transposed(a_smem.at[s]), b_smem.at[s])

                    def step(j, carry):
                        _consume_stage(
                            produced, consumed, wg, base + j, j, stages, cfg.delay, issue
                        )
                        return carry

                    jax.lax.fori_loop(0, steps, step, None)
                    _release_unit_end(consumed, base + steps, steps, stages, cfg.delay)
                    return acc_ref[...]

                def loop(i, base):
                    e, ia, q, ni, _, steps = unit(i)

                    @pl.when(i % 2 == wg)
                    def _():
                        acc = pl.run_scoped(
                            functools.partial(mma, base=base, steps=steps),
                            plgpu.ACC((TILE_M, cfg.bn)),
                        )
                        tile = (e, pl.ds(ia * TILE_M, TILE_M), pl.ds(ni * cfg.bn, cfg.bn))
                        for qq in range(p):
                            pl.when(q == qq)(
                                functools.partial(
                                    store_tile,
                                    acc.astype(out_dt),
                                    out_smem.at[wg],
                                    o_gmems[qq].at[tile],
                                    cfg.epi_n,
                                )
                            )

                    return base + steps

                jax.lax.fori_loop(0, n_local, loop, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_type = [jax.ShapeDtypeStruct((g, a_cols, n), out_dt)] * p
    kernel = _persistent_kernel(body, out_type, nsm, interpret)
    first_G = (row0_G // cfg.bk).astype(jnp.int32)
    steps_G = jnp.maximum((row1_G - row0_G + cfg.bk - 1) // cfg.bk, 0).astype(jnp.int32)
    blocks = [x.reshape(r // cfg.bk, cfg.bk, x.shape[1]) for x in (a_RA, *b_list)]
    return tuple(kernel(first_G, steps_G, *blocks))
