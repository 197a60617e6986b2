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
this kernel 2.19-2.32 ms with 128-row tiles (bit-equal to Triton's output) and wrong results with
64-row x 256-column tiles (max error 1.4x the output's max; not investigated). So the simple form
loses to Triton by 20%; a Mosaic GPU kernel worth having needs what jax's
`pallas/ops/gpu/hopper_matmul_mgpu.py` has: warp specialisation (a producer warpgroup, two
consumer warpgroups) and an epilogue that overlaps the next tile's loads.
"""

import argparse
import functools
import os
import statistics
import sys
import time

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


def time_ms(fn, args, steps):
    import jax

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(5):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / 5 * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lower", action="store_true", help="only lower the kernel for CUDA")
    ap.add_argument(
        "--configs",
        default="128,128,64,4;128,128,64,6;128,128,128,3;64,256,64,4",
        help="Mosaic GPU configs bm,bn,bk,steps separated by ';'",
    )
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from qwen3next_jax.ops import moe_pallas

    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    tg, r = layout(args.tokens)
    if args.lower:
        sd = jax.ShapeDtypeStruct
        for bm, bn, bk, steps in configs:
            f = functools.partial(down_mgpu, bm=bm, bn=bn, bk=bk, steps=steps)
            low = jax.jit(f).trace(
                sd(tg.shape, jnp.int32), sd((r, F), jnp.bfloat16), sd((EXPERTS, F, D), jnp.bfloat16)
            )
            low.lower(lowering_platforms=("cuda",))
            print(f"lowered for CUDA: bm={bm} bn={bn} bk={bk} steps={steps}")
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
    for bm, bn, bk, steps in configs:
        name = f"Mosaic GPU bm={bm} bn={bn} bk={bk} steps={steps}"
        try:
            f = jax.jit(functools.partial(down_mgpu, bm=bm, bn=bn, bk=bk, steps=steps))
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
