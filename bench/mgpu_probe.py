"""Probe: the MoE row-tile products as Mosaic GPU kernels (`ops/moe_mosaic.py`: TMA + wgmma,
warp-specialised) against the Triton kernels they replace and cuBLAS, on one H100/H200, one run.

    python3 bench/mgpu_probe.py [--tokens 32768] [--steps 20] [--down CFGS] [--dx CFGS]
                                [--wgrad CFGS] [--only down,dx,dWgu,dWd]
    python3 bench/mgpu_probe.py --lower     # lowers every config for CUDA (any host)

Products on `moe_pallas`'s tile-aligned row layout at Qwen3-Next shapes (F = 512, D = 2048, 512
experts, top-10, a uniform random routing; ~640 rows an expert at 32K tokens):
  down  y[R, D] = h[R, F] @ Wd[e]                       (moe_pallas._down vs moe_mosaic.down)
  dx    dx[R, D] = dg @ Wg[e]^T + du @ Wu[e]^T           (moe_pallas._dx vs moe_mosaic.dx)
  dWgu  dWg[e], dWu[e] = x_e^T dg_e, x_e^T du_e          (moe_pallas._tgmm2 reading x[tok] as
                                                         the layer does, and on sorted rows, vs
                                                         moe_mosaic.grouped_weight_grad)
  dWd   dWd[e] = h_e^T gy_e                              (the same, gy read by token)
"cuBLAS" is the dense product with one weight over all R rows (used and unused tiles): the same
work with no grouping, the ceiling; for the weight gradients, one batched product over R / 512
rows an expert (equal groups). The operands are as the fused layer sees them: padding rows
hold zeros, and half tiles (`moe_pallas.HALF_TILES`) are on for Triton's dx and both Mosaic
kernels. Each Mosaic config is checked against Triton's output on the used rows before it is
timed (unused tiles are left unwritten by it and read by nobody).
A config is bn,bk,stages,epi_n,delay (moe_mosaic.Config), configs separated by ';'.

History (bench/RESULTS.md): session 8 measured a single-warpgroup form of the down product at
2.19-2.32 ms against Triton's 1.82 (bit-equal output); session 9 the warp-specialised form of
moe_mosaic at 1.51-1.59 ms (cuBLAS 1.2), dx 2.95 (Triton 3.29-3.37); session 10 its ping-pong
form (consumers on alternate tiles, one ring never drained): down 1.25 ms, dx 2.88; session 11
the weight gradients (grouped_weight_grad): dW_gate + dW_up 2.15 ms (Triton 3.31, cuBLAS batched
2.46), dW_down 1.12-1.16 (Triton 1.58-1.63, cuBLAS 1.20).
"""

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

F, D, EXPERTS, TOPK = 512, 2048, 512, 10


def layout(tokens, seed=0):
    """(tile_group, half tiles, R, used-row mask [R], each group's rows [r0, r1)) of a uniform
    random routing of tokens x TOPK slots (as a fresh router)."""
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
    return tg, moe_pallas._half_tiles(tg, r1), r, used, r0, r1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lower", action="store_true", help="only lower the kernels for CUDA")
    ap.add_argument("--down", default="128,64,4,64,1;128,64,5,64,1;128,64,3,64,1;128,64,5,64,0")
    ap.add_argument("--dx", default="128,64,5,64,1;128,64,4,64,1;128,64,6,64,1;128,32,8,64,1")
    ap.add_argument("--wgrad", default="128,64,4,64,1;128,64,5,64,1;128,64,3,64,1;128,64,4,64,0")
    ap.add_argument("--only", default="down,dx,dWgu,dWd", help="products to time, comma-separated")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from moe import time_ms  # bench/moe.py (this script's folder is on sys.path)

    from qwen3next_jax.ops import moe_mosaic, moe_pallas

    def configs(text):
        return [moe_mosaic.Config(*(int(v) for v in c.split(","))) for c in text.split(";") if c]

    def label(c):
        return f"bn={c.bn} bk={c.bk} stages={c.stages} epi_n={c.epi_n} delay={c.delay}"

    tg, th, r, used, r0, r1 = layout(args.tokens)
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
    if args.lower:
        for op in ("down", "dx"):
            for name, f in variants[op]:
                try:
                    jax.jit(f).trace(*shapes[op]).lower(lowering_platforms=("cuda",))
                    print(f"lowered for CUDA: {op} {name}")
                except Exception as e:  # noqa: BLE001 - report each config
                    msg = str(e).splitlines()[0][:200] if str(e) else ""
                    print(f"{op} {name}: failed: {type(e).__name__}: {msg}")
        for c in configs(args.wgrad):
            f = functools.partial(moe_mosaic.grouped_weight_grad, r0, r1, config=c)
            a_s, b_s = sd((r, D), bf), sd((r, F), bf)
            jax.jit(lambda a, b, f=f: f(a, [b, b])).trace(a_s, b_s).lower(
                lowering_platforms=("cuda",)
            )
            print(f"lowered for CUDA: wgrad Mosaic GPU {label(c)}")

    keys = iter(jax.random.split(jax.random.key(1), 32))

    def rand(s, scale=1.0):
        return (jax.random.normal(next(keys), s.shape, jnp.float32) * scale).astype(s.dtype)

    if args.lower:
        return
    n_used = float(jnp.sum(jnp.repeat(tg >= 0, moe_pallas.TILE_M)))
    print(f"{args.tokens} tokens: R = {r} rows, {int(jnp.sum(tg >= 0))} used tiles", flush=True)
    table = []

    def row(op, name, ms, flops):  # printed as it comes: a hanging kernel leaves the rows before it
        table.append((op, name, ms, flops))
        print(f"{op}: {name}: {ms if ms is None else f'{ms:.3f}'} ms", flush=True)

    only = args.only.split(",")
    for op, depth in (("down", F), ("dx", 2 * F)):
        if op not in only:
            continue
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
        row(op, "Triton (moe_pallas, current TUNE)", time_ms(ref_fn, args_, args.steps), flops)
        if op == "down":  # [R, F] @ [F, D]
            a_all, w0 = args_[1], args_[2][0]
        else:  # [R, 2F] @ [2F, D]
            a_all = jnp.concatenate(args_[1:3], axis=1)
            w0 = jnp.concatenate([args_[3][0], args_[4][0]], axis=1).T
        dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
        cublas_ms = time_ms(dense, (a_all, w0), args.steps)
        row(op, "cuBLAS dense, one weight, all R rows", cublas_ms, flops * r / n_used)
        scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))

        def err(got, ref=ref, scale=scale):
            diff = jnp.where(used[:, None], got - ref, 0).astype(jnp.float32)
            return float(jnp.max(jnp.abs(diff))) / scale

        for name, fn in variants[op]:
            checked_row(row, op, name, jax.jit(fn), args_, err, args.steps, flops)
    wgrad_probe(args, (tg, r, used, r0, r1), n_used, configs(args.wgrad), label, rand, row, only)
    print("\n| product | kernel | ms | TFLOP/s |\n|---|---|---|---|")
    for op, name, ms, flops in table:
        tf = f"{flops / (ms * 1e-3) / 1e12:.0f}" if ms else "-"
        print(f"| {op} | {name} | {ms:.3f} | {tf} |" if ms else f"| {op} | {name} | - | - |")


def wgrad_probe(args, lay, n_used, cfgs, label, rand, row, only):
    """The weight gradients: Triton as the fused layer runs it (one operand read by token), the
    same kernels on sorted rows, one batched cuBLAS product, and grouped_weight_grad's configs
    (checked against Triton's output first)."""
    import jax
    import jax.numpy as jnp
    from moe import time_ms

    from qwen3next_jax.ops import moe_mosaic, moe_pallas

    bf = jnp.bfloat16
    _, r, used, r0, r1 = lay
    tok = jnp.where(used, jax.random.randint(jax.random.key(2), (r,), 0, args.tokens), 0)
    sd = jax.ShapeDtypeStruct
    x_tok = rand(sd((args.tokens, D), bf))
    x_rows = x_tok[tok]  # padding rows read token 0, as in the layer
    zero_pad = lambda a: jnp.where(used[:, None], a, 0)  # noqa: E731 - padding rows hold 0
    dg, du = zero_pad(rand(sd((r, F), bf))), zero_pad(rand(sd((r, F), bf)))
    h = zero_pad(rand(sd((r, F), bf)))
    gy_tok = rand(sd((args.tokens, D), bf))
    gy_rows = gy_tok[tok]
    per = r // EXPERTS  # the cuBLAS ceiling: equal groups of per rows

    def batched(a, b):
        ag, bg = (v[: per * EXPERTS].reshape(EXPERTS, per, -1) for v in (a, b))
        return jnp.einsum("gra,grb->gab", ag, bg, preferred_element_type=bf)

    cases = {
        "dWgu": (
            lambda x, tk: moe_pallas._tgmm2(r0, r1, x, dg, du, bf, tok_R=tk, gather=(True, False)),
            (x_tok, tok),
            lambda xs: moe_pallas._tgmm2(r0, r1, xs, dg, du, bf),
            (x_rows,),
            lambda xs, c: moe_mosaic.grouped_weight_grad(r0, r1, xs, [dg, du], config=c),
            (x_rows,),
            lambda xs: (batched(xs, dg), batched(xs, du)),
            2 * 2 * n_used * D * F,
        ),
        "dWd": (
            lambda gy, tk: moe_pallas._tgmm(r0, r1, h, [gy], bf, tok_R=tk, gather=(False, True)),
            (gy_tok, tok),
            lambda gys: moe_pallas._tgmm(r0, r1, h, [gys], bf),
            (gy_rows,),
            lambda gys, c: moe_mosaic.grouped_weight_grad(r0, r1, h, [gys], config=c),
            (gy_rows,),
            lambda gys: (batched(h, gys),),
            2 * n_used * D * F,
        ),
    }
    for op, (gath, gath_args, srt, srt_args, mos, mos_args, dense, flops) in cases.items():
        if op not in only:
            continue
        ref_fn = jax.jit(gath)
        ref = ref_fn(*gath_args)
        row(
            op, "Triton, read by token (the layer's)", time_ms(ref_fn, gath_args, args.steps), flops
        )
        row(op, "Triton, sorted rows", time_ms(jax.jit(srt), srt_args, args.steps), flops)
        row(
            op, "cuBLAS batched, equal groups", time_ms(jax.jit(dense), srt_args, args.steps), flops
        )
        scale = max(float(jnp.max(jnp.abs(v.astype(jnp.float32)))) for v in ref)

        def err(got, ref=ref, scale=scale):
            f32 = jnp.float32
            pairs = zip(got, ref, strict=True)
            return (
                max(float(jnp.max(jnp.abs(a.astype(f32) - b.astype(f32)))) for a, b in pairs)
                / scale
            )

        for c in cfgs:
            f = jax.jit(functools.partial(mos, c=c))
            checked_row(row, op, f"Mosaic GPU {label(c)}", f, mos_args, err, args.steps, flops)


def checked_row(row, op, name, fn, args_, err, steps, flops):
    """Runs fn once, reports err(output) (its distance from the reference, relative to the
    reference's max) in the row's name and times it; a config that fails is a row too."""
    from moe import time_ms

    try:
        e = err(fn(*args_))
        row(op, f"{name} (max err / max |ref| {e:.1e})", time_ms(fn, args_, steps), flops)
    except Exception as ex:  # noqa: BLE001 - a failing config is a result too
        msg = str(ex).splitlines()[0][:200] if str(ex) else ""
        row(op, f"{name}: failed: {type(ex).__name__}: {msg}", None, flops)


if __name__ == "__main__":
    main()
