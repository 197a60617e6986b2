"""Probe: the MoE row-tile products as Mosaic GPU kernels (`ops/moe_mosaic.py`: TMA + wgmma,
warp-specialised) against the Triton kernels they replace and cuBLAS, on one H100/H200, one run.

    python3 bench/mgpu_probe.py [--tokens 32768] [--steps 20] [--down CFGS] [--dx CFGS]
    python3 bench/mgpu_probe.py --lower     # lowers every config for CUDA (any host)

Products on `moe_pallas`'s tile-aligned row layout at Qwen3-Next shapes (F = 512, D = 2048, 512
experts, top-10, a uniform random routing; ~640 rows an expert at 32K tokens):
  down  y[R, D] = h[R, F] @ Wd[e]                       (moe_pallas._down vs moe_mosaic.down)
  dx    dx[R, D] = dg @ Wg[e]^T + du @ Wu[e]^T           (moe_pallas._dx vs moe_mosaic.dx)
"cuBLAS" is the dense product with one weight over all R rows (used and unused tiles): the same
work with no grouping, the ceiling. The operands are as the fused layer sees them: padding rows
hold zeros, and half tiles (`moe_pallas.HALF_TILES`) are on for Triton's dx and both Mosaic
kernels. Each Mosaic config is checked against Triton's output on the used rows before it is
timed (unused tiles are left unwritten by it and read by nobody).
A config is bn,bk,steps,epi_n,delay_release (moe_mosaic.Config), configs separated by ';'.
`--pingpong` configs (bn,bk,stages,delay) time `down_pingpong`, a form of the down product
whose two consumer warpgroups work on different tiles through one ring of stages that is never
drained between tiles (checked on the CPU in Pallas's GPU interpret mode; not yet run on a GPU).

History (bench/RESULTS.md): session 8 measured a single-warpgroup form of the down product at
2.19-2.32 ms against Triton's 1.82 (bit-equal output); session 9 the warp-specialised form of
moe_mosaic at 1.51-1.59 ms (cuBLAS 1.2), dx 2.95 (Triton 3.29-3.37).
"""

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

F, D, EXPERTS, TOPK = 512, 2048, 512, 10


def down_pingpong(
    tg_T, h_RF, w_GFD, *, bn=128, bk=64, stages=4, delay=0, num_sms=None, interpret=False
):
    """The forward down product with the two consumer warpgroups on different output tiles
    ([128, bn] each, alternating through the CTA's tile list) fed by one producer warpgroup
    through one ring of `stages` shared-memory stages. A consumer stores its tile while the
    other multiplies, and the producer never drains the ring between tiles (moe_mosaic's
    pipeline waits for every stage to be consumed at the end of each tile). delay: wgmma groups
    left in flight before a stage is handed back (0 or 1). Full tiles only (no half tiles)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from qwen3next_jax.ops import moe_mosaic

    r, f = h_RF.shape
    d = w_GFD.shape[2]
    tm, epi_n = 128, 64
    k_steps = f // bk
    if k_steps % stages or d % bn or f % bk:
        raise ValueError(f"pingpong: stages {stages} must divide {k_steps} steps; bn | D, bk | F")
    n_iters = d // bn
    n_tiles = (r // tm) * n_iters
    nsm = num_sms or (2 if interpret else moe_mosaic._num_sms())
    dt = h_RF.dtype
    item = jnp.dtype(dt).itemsize

    def tf(cols):
        return moe_mosaic.smem_transforms(cols, dt)

    def body(tg_gmem, h_gmem, w_gmem, o_gmem):
        @functools.partial(
            pl.run_scoped,
            a_smem=plgpu.SMEM((stages, tm, bk), dt, transforms=tf(bk)),
            b_smem=plgpu.SMEM((stages, bk, bn), dt, transforms=tf(min(bn, 128 // item))),
            out_smem=plgpu.SMEM((2, 2, moe_mosaic.EPI_M, epi_n), dt, transforms=tf(epi_n)),
            produced=plgpu.Barrier(num_arrivals=2, num_barriers=2 * stages),
            consumed=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            collective_axes="wg",
        )
        def _scope(a_smem, b_smem, out_smem, produced, consumed):
            wg = jax.lax.axis_index("wg")
            c = jax.lax.axis_index("sm")
            n_local = (n_tiles - c + nsm - 1) // nsm

            def tile(i):
                t = c + i * nsm
                mi = t // n_iters
                return mi, t % n_iters, tg_gmem[mi]

            @pl.when(wg == 2)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")

                def loop(i, used):
                    mi, ni, e = tile(i)
                    owner = i % 2

                    @pl.when(e >= 0)
                    def _():
                        for k in range(k_steps):
                            s = k % stages
                            if k < stages:  # a stage's first fill waits for nobody

                                @pl.when(used > 0)
                                def _(s=s):
                                    plgpu.barrier_wait(consumed.at[s])

                            else:
                                plgpu.barrier_wait(consumed.at[s])
                            bar = produced.at[owner * stages + s]
                            plgpu.copy_gmem_to_smem(
                                h_gmem.at[pl.ds(mi * tm, tm), pl.ds(k * bk, bk)], a_smem.at[s], bar
                            )
                            plgpu.copy_gmem_to_smem(
                                w_gmem.at[jnp.maximum(e, 0), pl.ds(k * bk, bk), pl.ds(ni * bn, bn)],
                                b_smem.at[s],
                                bar,
                            )

                    return used + (e >= 0).astype(jnp.int32)

                used = jax.lax.fori_loop(0, n_local, loop, jnp.int32(0))

                @pl.when(used > 0)
                def _():  # the last consumption of every stage, so no barrier is left mid-phase
                    for s in range(stages):
                        plgpu.barrier_wait(consumed.at[s])

            @pl.when(wg < 2)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")

                def loop(i, carry):
                    mi, ni, e = tile(i)

                    @pl.when((i % 2 == wg) & (e >= 0))
                    def _():
                        def acc_scope(acc_ref):
                            for k in range(k_steps):
                                s = k % stages
                                plgpu.barrier_wait(produced.at[wg * stages + s])
                                plgpu.wgmma(acc_ref, a_smem.at[s], b_smem.at[s])
                                plgpu.wgmma_wait(delay)
                                if delay and k:
                                    plgpu.barrier_arrive(consumed.at[(k - 1) % stages])
                                elif not delay:
                                    plgpu.barrier_arrive(consumed.at[s])
                            if delay:
                                plgpu.wgmma_wait(0)
                                plgpu.barrier_arrive(consumed.at[(k_steps - 1) % stages])
                            return acc_ref[...]

                        acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, bn))).astype(dt)
                        moe_mosaic.store_tile(
                            acc,
                            out_smem.at[wg],
                            o_gmem.at[pl.ds(mi * tm, tm), pl.ds(ni * bn, bn)],
                            epi_n,
                        )

                    return carry

                jax.lax.fori_loop(0, n_local, loop, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((r, d), dt),
        grid=(nsm,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": moe_mosaic._interpret_params()} if interpret else {}),
    )
    return kernel(tg_T.astype(jnp.int32), h_RF, w_GFD)


def layout(tokens, seed=0):
    """(tile_group, half tiles, R, used-row mask [R]) of a uniform random routing of tokens x
    TOPK slots (as a fresh router)."""
    import jax
    import jax.numpy as jnp

    from qwen3next_jax.ops import moe_pallas
    from qwen3next_jax.ops.moe_dispatch import round_up

    idx = jax.random.randint(jax.random.key(seed), (tokens * TOPK,), 0, EXPERTS)
    sizes = jnp.bincount(idx, length=EXPERTS).astype(jnp.int32)
    padded = round_up(sizes, moe_pallas.TILE_M)
    start = jnp.cumsum(padded) - padded
    r = round_up(tokens * TOPK + EXPERTS * (moe_pallas.TILE_M - 1), moe_pallas.TILE_M)
    tg, r0, r1 = moe_pallas._tile_maps(sizes, start, r)
    rows = jnp.arange(r)
    g = jnp.maximum(jnp.repeat(tg, moe_pallas.TILE_M), 0)
    used = (jnp.repeat(tg, moe_pallas.TILE_M) >= 0) & (rows >= r0[g]) & (rows < r1[g])
    return tg, moe_pallas._half_tiles(tg, r1), r, used


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lower", action="store_true", help="only lower the kernels for CUDA")
    ap.add_argument("--down", default="128,64,4,64,0")
    ap.add_argument("--dx", default="128,64,2,64,0")
    ap.add_argument(
        "--pingpong",
        default="128,64,4,0;128,64,4,1;128,64,2,1",
        help="down_pingpong configs bn,bk,stages,delay separated by ';'",
    )
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from moe import time_ms  # bench/moe.py (this script's folder is on sys.path)

    from qwen3next_jax.ops import moe_mosaic, moe_pallas

    def configs(text):
        return [moe_mosaic.Config(*(int(v) for v in c.split(","))) for c in text.split(";") if c]

    def label(c):
        return f"bn={c.bn} bk={c.bk} steps={c.steps} epi_n={c.epi_n} delay={c.delay_release}"

    tg, th, r, used = layout(args.tokens)
    bf = jnp.bfloat16
    sd = jax.ShapeDtypeStruct
    shapes = {
        "down": (sd(tg.shape, jnp.int32), sd((r, F), bf), sd((EXPERTS, F, D), bf)),
        "dx": (
            sd(tg.shape, jnp.int32),
            sd((r, F), bf),
            sd((r, F), bf),
            sd((EXPERTS, D, F), bf),
            sd((EXPERTS, D, F), bf),
        ),
    }
    # as the fused layer calls them: half tiles in Triton's dx and in both Mosaic kernels
    triton = {"down": moe_pallas._down, "dx": lambda *a: moe_pallas._dx(*a, th)}
    mosaic = {"down": moe_mosaic.down, "dx": moe_mosaic.dx}
    variants = {
        op: [
            (f"Mosaic GPU {label(c)}", functools.partial(mosaic[op], half_T=th, config=c))
            for c in configs(getattr(args, op))
        ]
        for op in ("down", "dx")
    }
    for c in args.pingpong.split(";"):
        if c:
            bn, bk, stages, delay = (int(v) for v in c.split(","))
            variants["down"].append(
                (
                    f"Mosaic GPU ping-pong bn={bn} bk={bk} stages={stages} delay={delay}",
                    functools.partial(down_pingpong, bn=bn, bk=bk, stages=stages, delay=delay),
                )
            )
    if args.lower:
        for op in ("down", "dx"):
            for name, f in variants[op]:
                try:
                    jax.jit(f).trace(*shapes[op]).lower(lowering_platforms=("cuda",))
                    print(f"lowered for CUDA: {op} {name}")
                except Exception as e:  # noqa: BLE001 - report each config
                    msg = str(e).splitlines()[0][:200] if str(e) else ""
                    print(f"{op} {name}: failed: {type(e).__name__}: {msg}")
        return

    keys = iter(jax.random.split(jax.random.key(1), 8))

    def rand(s, scale=1.0):
        return (jax.random.normal(next(keys), s.shape, jnp.float32) * scale).astype(s.dtype)

    n_used = float(jnp.sum(jnp.repeat(tg >= 0, moe_pallas.TILE_M)))
    print(f"{args.tokens} tokens: R = {r} rows, {int(jnp.sum(tg >= 0))} used tiles", flush=True)
    table = []
    for op, depth in (("down", F), ("dx", 2 * F)):
        # rows ~ N(0, 1), weights [G, ., .] ~ N(0, 1 / F)
        # padding rows hold zeros, as the dispatch leaves them
        args_ = (
            tg,
            *(
                rand(s, F**-0.5) if len(s.shape) == 3 else jnp.where(used[:, None], rand(s), 0)
                for s in shapes[op][1:]
            ),
        )
        flops = 2 * n_used * depth * D
        ref_fn = jax.jit(triton[op])
        ref = ref_fn(*args_)
        table.append(
            (op, "Triton (moe_pallas, current TUNE)", time_ms(ref_fn, args_, args.steps), flops)
        )
        if op == "down":  # [R, F] @ [F, D]
            a_all, w0 = args_[1], args_[2][0]
        else:  # [R, 2F] @ [2F, D]
            a_all = jnp.concatenate(args_[1:3], axis=1)
            w0 = jnp.concatenate([args_[3][0], args_[4][0]], axis=1).T
        dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
        cublas_ms = time_ms(dense, (a_all, w0), args.steps)
        table.append((op, "cuBLAS dense, one weight, all R rows", cublas_ms, flops * r / n_used))
        for name, fn in variants[op]:
            try:
                f = jax.jit(fn)
                diff = jnp.where(used[:, None], f(*args_) - ref, 0).astype(jnp.float32)
                err = float(jnp.max(jnp.abs(diff)) / jnp.max(jnp.abs(ref.astype(jnp.float32))))
                table.append(
                    (
                        op,
                        f"{name} (max err / max |ref| {err:.1e})",
                        time_ms(f, args_, args.steps),
                        flops,
                    )
                )
            except Exception as e:  # noqa: BLE001 - a failing config is a result too
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                table.append((op, f"{name}: failed: {type(e).__name__}: {msg}", None, flops))
    print("\n| product | kernel | ms | TFLOP/s |\n|---|---|---|---|")
    for op, name, ms, flops in table:
        tf = f"{flops / (ms * 1e-3) / 1e12:.0f}" if ms else "-"
        print(f"| {op} | {name} | {ms:.3f} | {tf} |" if ms else f"| {op} | {name} | - | - |")


if __name__ == "__main__":
    main()
