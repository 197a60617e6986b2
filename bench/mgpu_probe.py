"""Probe: the MoE forward down product as a Mosaic GPU kernel (wgmma fed by TMA), against the
Triton kernel it would replace and cuBLAS, on one H100/H200, all in one run.

    python3 bench/mgpu_probe.py [--tokens 32768] [--steps 20]
    python3 bench/mgpu_probe.py --lower     # lowers the Mosaic GPU kernel for CUDA (any host)

The product: y[R, D] = h[R, F] @ Wd[tile_group[r // 128]] on the tile-aligned row layout of
`moe_pallas` (every 128-row tile belongs to one expert or is unused), at Qwen3-Next shapes
(F = 512, D = 2048, 512 experts, top-10; ~640 rows an expert at 32K tokens). The Triton kernel
(`moe_pallas._down`) runs at ~60% of the cuBLAS rate; the question this probe answers is whether a
Mosaic GPU kernel of the simplest form (one warpgroup, a persistent loop over output tiles, a TMA
pipeline over the contraction, the weight block chosen by the tile's expert) does better before
the grouped products move to Mosaic GPU. "cuBLAS" is the dense [R, F] @ [F, D] product: the same
FLOPs with one weight, the ceiling. Rows of unused tiles are not compared (nothing reads them).

Measured on an H200 on 2026-12-03 (bench/RESULTS.md, session 8): Triton 1.82 ms, cuBLAS 1.26 ms,
`down_mgpu` 2.19-2.32 ms with 128-row tiles (bit-equal to Triton's output) and wrong results with
64-row x 256-column tiles (max error 1.4x the output's max; not investigated). So the simple form
loses to Triton by 20%; a Mosaic GPU kernel worth having needs what jax's
`pallas/ops/gpu/hopper_matmul_mgpu.py` has: warp specialisation (a producer warpgroup, two
consumer warpgroups) and stores that overlap the next tile's loads. `down_mgpu_ws` is that form,
written after the session's device time was spent: it lowers for CUDA on a CPU host (`--lower`)
and has not run on a GPU yet (the run checks it against Triton's output before timing it).
"""

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

F, D, EXPERTS, TOPK = 512, 2048, 512, 10
NUM_SMS = 132  # H100 SXM / H200


def down_mgpu(tg_T, h_RF, w_GFD, *, bm=128, bn=128, bk=64, steps=4, grid_block_n=1):
    """[R, D] = h rows of tile t times w[tg[t]] (tiles with tg < 0 are skipped, left unwritten)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    r, f = h_RF.shape
    d = w_GFD.shape[2]
    m_iters, n_iters = r // bm, d // bn

    def body(tg_gmem, h_gmem, w_gmem, o_gmem):
        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tiles(info):
            mi, ni = plgpu.planar_snake(info.index[0], (m_iters, n_iters), 1, grid_block_n)
            e = tg_gmem[mi]

            @pl.when(e >= 0)
            def _():
                def acc_scope(acc_ref):
                    plgpu.emit_pipeline(
                        lambda _, h_smem, w_smem: plgpu.wgmma(acc_ref, h_smem, w_smem),
                        grid=(f // bk,),
                        in_specs=[
                            plgpu.BlockSpec((bm, bk), lambda k: (mi, k), delay_release=1),
                            plgpu.BlockSpec((bk, bn), lambda k: (k, ni), delay_release=1),
                        ],
                        max_concurrent_steps=steps,
                    )(h_gmem, w_gmem.at[e])
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))

                @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), o_gmem.dtype))
                def _store(o_smem):
                    o_smem[...] = acc.astype(o_smem.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        o_smem, o_gmem.at[pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)]
                    )
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((r, d), h_RF.dtype),
        grid=(NUM_SMS,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(tg_T.astype(jnp.int32), h_RF, w_GFD)


def down_mgpu_ws(tg_T, h_RF, w_GFD, *, bn=128, bk=64, steps=4, epi_n=64):
    """down_mgpu, warp-specialised: per CTA one 128-row tile and 2 * bn columns, a producer
    warpgroup issuing the TMA loads and two consumer warpgroups (bn columns each) issuing the
    wgmma; the epilogue stores through shared memory in [64, epi_n] pieces, two in flight."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    r, f = h_RF.shape
    d = w_GFD.shape[2]
    bm, cta_n, epi_m = 128, 2 * bn, 64
    m_iters, n_iters = r // bm, d // cta_n
    dt = h_RF.dtype
    swizzle = plgpu.find_swizzle(bk * jnp.dtype(dt).itemsize * 8)
    in_tf = (
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dt).itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )
    out_swizzle = plgpu.find_swizzle(epi_n * jnp.dtype(dt).itemsize * 8)
    out_tf = (
        plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dt).itemsize)),
        plgpu.SwizzleTransform(out_swizzle),
    )

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(f // bk,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec(
                    (bm, bk), lambda k: (0, k), transforms=in_tf, memory_space=plgpu.SMEM
                ),
                plgpu.BlockSpec(
                    (bk, cta_n), lambda k: (k, 0), transforms=in_tf, memory_space=plgpu.SMEM
                ),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=steps,
            compute_context=compute_context,
        )

    def body(tg_gmem, h_gmem, w_gmem, o_gmem):
        unused = lambda *_, **__: None  # noqa: E731 - the allocations ignore the bodies

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(unused, unused).get_allocations(h_gmem, w_gmem.at[0]),
            out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), dt, transforms=out_tf),
            collective_axes="wg",
        )
        def _scope(allocs, out_smem):
            wg = jax.lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
            def _tiles(info):
                mi, ni = plgpu.planar_snake(info.index[0], (m_iters, n_iters), 1, 1)
                e = tg_gmem[mi]
                rows = pl.ds(mi * bm, bm)
                cols = pl.ds(ni * cta_n, cta_n)
                wg_cols = pl.ds(wg * bn, bn)

                def compute_context(run):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn), jnp.float32))
                    def _acc(acc_ref):
                        run(acc_ref)
                        acc = acc_ref[...].astype(dt)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for i in range(bm // epi_m):
                            for j in range(bn // epi_n):
                                slot = (i * (bn // epi_n) + j) % 2
                                piece = (
                                    slice(i * epi_m, (i + 1) * epi_m),
                                    slice(j * epi_n, (j + 1) * epi_n),
                                )
                                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                                out_smem[wg, slot] = acc[piece]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg, slot],
                                    o_gmem.at[rows, cols].at[:, wg_cols].at[piece],
                                )

                def mma(_, h_smem, w_smem, acc_ref):
                    plgpu.wgmma(acc_ref, h_smem, w_smem.at[:, wg_cols])
                    plgpu.wgmma_wait(0)
                    return acc_ref

                @pl.when(e >= 0)
                def _():
                    pipeline(mma, compute_context)(
                        h_gmem.at[rows, :],
                        w_gmem.at[jnp.maximum(e, 0)].at[:, cols],
                        allocations=allocs,
                    )

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((r, d), dt),
        grid=(NUM_SMS,),
        grid_names=("cluster_grid",),
        cluster=(1,),
        cluster_names=("cluster",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(tg_T.astype(jnp.int32), h_RF, w_GFD)


def layout(tokens, seed=0):
    """(tile_group, R) of a uniform random routing of tokens x TOPK slots (as a fresh router)."""
    import jax
    import jax.numpy as jnp

    from qwen3next_jax.ops import moe_pallas
    from qwen3next_jax.ops.moe_dispatch import round_up

    idx = jax.random.randint(jax.random.key(seed), (tokens * TOPK,), 0, EXPERTS)
    sizes = jnp.bincount(idx, length=EXPERTS).astype(jnp.int32)
    padded = round_up(sizes, moe_pallas.TILE_M)
    start = jnp.cumsum(padded) - padded
    r = round_up(tokens * TOPK + EXPERTS * (moe_pallas.TILE_M - 1), moe_pallas.TILE_M)
    tg, _, _ = moe_pallas._tile_maps(sizes, start, r)
    return tg, r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lower", action="store_true", help="only lower the kernel for CUDA")
    ap.add_argument(
        "--configs",
        default="128,128,64,4;128,128,64,6;128,128,128,3;64,256,64,4",
        help="down_mgpu configs bm,bn,bk,steps separated by ';'",
    )
    ap.add_argument(
        "--ws-configs",
        default="128,64,4;64,64,6;128,64,3",
        help="down_mgpu_ws configs bn,bk,steps (bn columns per consumer warpgroup) by ';'",
    )
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from moe import time_ms  # bench/moe.py (this script's folder is on sys.path)

    from qwen3next_jax.ops import moe_pallas

    def parse(text):
        return [tuple(int(v) for v in c.split(",")) for c in text.split(";") if c]

    kernels = [
        (
            f"Mosaic GPU bm={bm} bn={bn} bk={bk} steps={st}",
            functools.partial(down_mgpu, bm=bm, bn=bn, bk=bk, steps=st),
        )
        for bm, bn, bk, st in parse(args.configs)
    ] + [
        (
            f"Mosaic GPU warp-specialised 128 x (2 x {bn}) bk={bk} steps={st}",
            functools.partial(down_mgpu_ws, bn=bn, bk=bk, steps=st),
        )
        for bn, bk, st in parse(args.ws_configs)
    ]
    tg, r = layout(args.tokens)
    if args.lower:
        sd = jax.ShapeDtypeStruct
        shapes = (
            sd(tg.shape, jnp.int32),
            sd((r, F), jnp.bfloat16),
            sd((EXPERTS, F, D), jnp.bfloat16),
        )
        for name, f in kernels:
            try:
                jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))
                print(f"lowered for CUDA: {name}")
            except Exception as e:  # noqa: BLE001 - report each config
                print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return

    kh, kw = jax.random.split(jax.random.key(1))
    h = (jax.random.normal(kh, (r, F), jnp.float32)).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (EXPERTS, F, D), jnp.float32) / F**0.5).astype(jnp.bfloat16)
    used = jnp.repeat(tg >= 0, moe_pallas.TILE_M)
    flops = 2 * float(jnp.sum(used)) * F * D
    print(f"{args.tokens} tokens: R = {r} rows, {int(jnp.sum(tg >= 0))} used tiles", flush=True)

    triton = jax.jit(moe_pallas._down)
    ref = triton(tg, h, w)
    args3 = (tg, h, w)
    rows = [("Triton (moe_pallas._down, current defaults)", time_ms(triton, args3, args.steps))]
    dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    w0 = w[0]
    rows.append(("cuBLAS dense [R, F] @ [F, D] (one weight)", time_ms(dense, (h, w0), args.steps)))
    for name, fn in kernels:
        try:
            f = jax.jit(fn)
            diff = jnp.where(used[:, None], f(*args3) - ref, 0).astype(jnp.float32)
            err = float(jnp.max(jnp.abs(diff)) / jnp.max(jnp.abs(ref.astype(jnp.float32))))
            rows.append((f"{name} (max err / max |ref| {err:.1e})", time_ms(f, args3, args.steps)))
        except Exception as e:  # noqa: BLE001 - a failing config is a result too
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            rows.append((f"{name}: failed: {type(e).__name__}: {msg}", None))
    print("\n| kernel | ms | TFLOP/s (used rows) |\n|---|---|---|")
    for name, ms in rows:
        tf = f"{flops / (ms * 1e-3) / 1e12:.0f}" if ms else "-"
        print(f"| {name} | {ms:.3f} | {tf} |" if ms else f"| {name} | - | - |")


if __name__ == "__main__":
    main()
