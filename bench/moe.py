"""MoE layer benchmark at Qwen3-Next-80B shapes (hidden 2048, 512 experts, top-10, width 512, bf16).

    python3 bench/moe.py                # one GPU: every backend vs HF's Qwen3NextSparseMoeBlock
    python3 bench/moe.py --ep           # all visible GPUs: expert-parallel per-GPU throughput
    python3 bench/moe.py --check        # correctness of the GPU backends vs references, then exit
    python3 bench/moe.py --sweep        # Pallas block-size sweep at 32K tokens, fwd+bwd
    python3 bench/moe.py --breakdown --tokens 32768 --backends pallas pallas_fused
                                        # each part / kernel of the layer alone, per backend
    python3 bench/moe.py --dry ...      # tiny shapes on any platform (CPU: Pallas interpret)

`pallas` materialises the expert-sorted copy of x and of the output rows; `pallas_fused` runs the
same kernels reading x / the output cotangent through the row map (moe_pallas.fused_routed_swiglu).

The layer = router (fp32 softmax, top-10, renormalised) + routed experts (qwen3next_jax.ops.moe)
+ sigmoid-gated shared expert, written inline with jnp. TFLOP/s count only the routed experts'
matmuls: tokens x 10 x 6 x 2048 x 512 per forward, x3 for forward+backward; "% mm" divides by an
8192^3 bf16 matmul measured in the same run. Times are medians after warm-up (JAX: batches of 5
calls issued back to back, one host sync per batch, and a host sync per call; HF: CUDA events
per call). fwd+bwd = the output and its backward from a fixed bf16 cotangent, as HF's
`block(x).backward(cot)`. The markdown table is printed last and written to $OUT/moe_bench.md
(default ./out).
"""

import argparse
import json
import os
import statistics
import sys
import time
import types

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch runs in the same host
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HIDDEN, EXPERTS, TOPK, WIDTH = 2048, 512, 10, 512
MATMUL_N = 8192  # side of the bf16 matmul that "% mm" is measured against
ROUTER_IMPL = "xla"  # --router: moe.router_topk impl ('xla' or the fused 'pallas' kernel)


def set_dry_shapes():
    """--dry: shapes small enough for Pallas interpret mode on a CPU (checks the code path only)."""
    global HIDDEN, EXPERTS, WIDTH, MATMUL_N
    HIDDEN, EXPERTS, WIDTH, MATMUL_N = 256, 16, 128, 256


def expert_flops(tokens: int, mode: str) -> float:
    return tokens * TOPK * 6 * HIDDEN * WIDTH * (3 if mode == "fwd+bwd" else 1)


# --------------------------------------------------------------------------- HF torch reference
def hf_main(tokens_list, steps, experts_impl):
    """Runs in a child process (so torch and JAX don't share an allocator); prints JSON.
    experts_impl: transformers' experts backend ('grouped_mm'; 'eager' = its per-expert loop)."""
    import torch
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    cfg = Qwen3NextConfig(
        hidden_size=HIDDEN,
        num_experts=EXPERTS,
        num_experts_per_tok=TOPK,
        moe_intermediate_size=WIDTH,
        shared_expert_intermediate_size=WIDTH,
        norm_topk_prob=True,
    )
    cfg._experts_implementation = experts_impl  # read by the experts module at forward time
    block = Qwen3NextSparseMoeBlock(cfg).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    out = {"experts_implementation": str(getattr(cfg, "_experts_implementation", None))}

    import hf_child  # bench/ is on sys.path

    def timed(fn):
        return hf_child.cuda_median_ms(fn, steps, warmup=3)

    for t in tokens_list:
        x = torch.randn(1, t, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cot = torch.randn(1, t, HIDDEN, device="cuda", dtype=torch.bfloat16)

        def fwd(x=x):
            with torch.no_grad():
                block(x)

        def fwd_bwd(x=x, cot=cot):
            y = block(x)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(cot)

        try:
            out[str(t)] = {"fwd": timed(fwd), "fwd+bwd": timed(fwd_bwd)}
        except Exception as e:  # noqa: BLE001 - report, don't die: the JAX side still runs
            out[str(t)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        del x, cot
        torch.cuda.empty_cache()
    hf_child.emit(out)


def run_hf(tokens_list, steps, experts_impl):
    import hf_child  # bench/ is on sys.path

    argv = ["--hf-child", "--hf-experts", experts_impl, "--steps", str(steps), "--tokens"]
    return hf_child.run(os.path.abspath(__file__), argv + [str(t) for t in tokens_list], 600)


# --------------------------------------------------------------------------- JAX side
def import_tokamax() -> bool:
    """True if tokamax imports. tokamax imports xprof only for its own profiling; where that
    package is absent (this GPU image), a stub keeps the kernels importable."""
    try:
        import tokamax  # noqa: F401

        return True
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("xprof"):
            return False
    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
    try:
        import tokamax  # noqa: F401, F811

        return True
    except Exception:  # noqa: BLE001
        return False


def init_params(key, dtype):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(key, 8)

    def n(k, shape, fan_in):
        return (jax.random.normal(k, shape, jnp.float32) / fan_in**0.5).astype(dtype)

    return {
        "router_DE": n(ks[0], (HIDDEN, EXPERTS), HIDDEN),
        "gate_EDF": n(ks[1], (EXPERTS, HIDDEN, WIDTH), HIDDEN),
        "up_EDF": n(ks[2], (EXPERTS, HIDDEN, WIDTH), HIDDEN),
        "down_EFD": n(ks[3], (EXPERTS, WIDTH, HIDDEN), WIDTH),
        "s_gate_DF": n(ks[4], (HIDDEN, WIDTH), HIDDEN),
        "s_up_DF": n(ks[5], (HIDDEN, WIDTH), HIDDEN),
        "s_down_FD": n(ks[6], (WIDTH, HIDDEN), WIDTH),
        "s_gate_D1": n(ks[7], (HIDDEN, 1), HIDDEN),
    }


def moe_layer(params, x_TD, *, backend, capacity_factor=None, mesh=None):
    import jax.numpy as jnp

    from qwen3next_jax.ops import moe

    f32 = jnp.float32
    logits_TE = moe.router_logits(x_TD, params["router_DE"])
    weights_TK, idx_TK, _ = moe.router_topk(logits_TE, TOPK, impl=ROUTER_IMPL, mesh=mesh)
    y_TD, stats = moe.routed_experts(
        x_TD,
        weights_TK,
        idx_TK,
        params["gate_EDF"],
        params["up_EDF"],
        params["down_EFD"],
        backend=backend,
        capacity_factor=capacity_factor,
        mesh=mesh,
    )
    return (y_TD.astype(f32) + shared_expert(params, x_TD).astype(f32)).astype(x_TD.dtype), stats


def shared_expert(p, x_TD):
    """The gated shared expert as the model computes it (layers/mlp.py, layers/moe.py): 16-bit
    projections with 16-bit results, the sigmoid gate's logit in fp32 (ops/linear.py)."""
    import jax
    import jax.numpy as jnp

    from qwen3next_jax.ops.linear import einsum_f32

    dt = x_TD.dtype
    g = jnp.dot(x_TD, p["s_gate_DF"], preferred_element_type=dt)
    u = jnp.dot(x_TD, p["s_up_DF"], preferred_element_type=dt)
    s_TD = jnp.dot(jax.nn.silu(g) * u, p["s_down_FD"], preferred_element_type=dt)
    gate_T1 = jax.nn.sigmoid(einsum_f32("td,do->to", x_TD, p["s_gate_D1"]))
    return gate_T1 * s_TD.astype(jnp.float32)


def make_fns(backend, capacity_factor=None, mesh=None):
    import jax

    def fwd(params, x, cot):
        return moe_layer(params, x, backend=backend, capacity_factor=capacity_factor, mesh=mesh)

    def fwd_bwd(params, x, cot):
        """(grads of params and x, stats, y): the layer's output and its backward from the
        cotangent `cot`, as HF's timed `block(x).backward(cot)`. The output is returned so that
        the forward's last products stay in the program (gradients alone need no y: XLA then
        drops the down projection and the combine, as it did in every fwd+bwd row before
        2026-11-29, session 5). Until 2026-12-03 (session 8) this was the value and gradient of
        sum(y * cot) with an fp32 cot: one more [T, D] reduction and an fp32 read a step."""
        y, vjp, stats = jax.vjp(lambda p, x_: fwd(p, x_, cot), params, x, has_aux=True)
        return vjp(cot.astype(y.dtype)), stats, y

    return jax.jit(fwd), jax.jit(fwd_bwd)


def time_ms(fn, args, steps, warmup=2, inner=5):
    """Median over `steps` batches of the mean time of `inner` calls issued back to back with one
    host sync per batch (as a training loop dispatches: no host round trip between steps, which
    HF's CUDA-event timing leaves out too); inner=1 syncs after every call. On an H200 at 32K
    tokens batches of 20 calls read the same per call as batches of 5 (18.19 / 18.14 ms)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    print(f"  first call (compile + run) {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    from kernel_profile import batch_seconds  # bench/ is on sys.path

    return statistics.median(batch_seconds(fn, args, inner) / inner for _ in range(steps)) * 1e3


def trace_busy(fn, args, inner=5):
    """--trace: {"fwd+bwd_traced", "fwd+bwd_busy", "fwd+bwd_window"} ms per call over one
    profiled batch of `inner` back-to-back calls: its wall time, the GPU's kernel time (streams
    merged) and the span from the first kernel's start to the last one's end. The batch follows
    an idle pause, so it starts at higher clocks than sustained load allows (the power cap): its
    times read shorter than the untraced ones (kernel_profile.py's docstring); it shows the GPU's
    idle share, not the step's speed."""
    from kernel_profile import idle_gaps, steps_in, traced_batch  # bench/ is on sys.path

    events, wall = traced_batch(fn, args, inner)
    if not events:
        return {}
    window, busy, _ = idle_gaps(events)
    n = steps_in(events)
    return {
        "fwd+bwd_traced": wall / inner * 1e3 if n == inner else float("nan"),
        "fwd+bwd_busy": busy / n / 1e6,
        "fwd+bwd_window": window / n / 1e6,
    }


def matmul_tflops(steps):
    import jax
    import jax.numpy as jnp

    n = MATMUL_N
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    ms = time_ms(jax.jit(jnp.dot), (a, b), steps)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def inputs(tokens, key=0, dtype=None):
    import jax
    import jax.numpy as jnp

    dtype = dtype or jnp.bfloat16
    kx, kc = jax.random.split(jax.random.key(key + 1))
    x = jax.random.normal(kx, (tokens, HIDDEN), jnp.float32).astype(dtype)
    cot = jax.random.normal(kc, (tokens, HIDDEN), jnp.float32).astype(dtype)  # as HF's
    return x, cot


def backends_to_run(names):
    out = []
    for name in names:
        if name == "tokamax" and not import_tokamax():
            print("tokamax not importable: skipped", flush=True)
            continue
        out.append(name)
    return out


def label(backend, cf):
    name = backend if ROUTER_IMPL == "xla" else f"{backend} + {ROUTER_IMPL} router"
    return name if cf is None else f"{name} (cf {cf}, drops)"


def bench_single(args, mm_rate):
    import jax

    params = init_params(jax.random.key(0), jax.numpy.bfloat16)
    rows = []
    configs = [(b, None) for b in backends_to_run(args.backends)]
    if args.padded_cf:
        configs.append(("padded", args.padded_cf))
    for tokens in args.tokens:
        x, cot = inputs(tokens)
        for backend, cf in configs:
            row = {"tokens": tokens, "impl": label(backend, cf)}
            try:
                fwd, grad = make_fns(backend, cf)
                _, stats = fwd(params, x, cot)
                row["dropped"] = float(stats["dropped_fraction"])
                row["fwd"] = time_ms(fwd, (params, x, cot), args.steps)
                row["fwd+bwd"] = time_ms(grad, (params, x, cot), args.steps)
                row["fwd+bwd_sync"] = time_ms(grad, (params, x, cot), args.steps, inner=1)
                if args.trace:
                    row.update(trace_busy(grad, (params, x, cot)))
            except Exception as e:  # noqa: BLE001 - a failing backend is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def bench_ep(args):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
    backend = args.backends[0]
    params = init_params(jax.random.key(0), jnp.bfloat16)
    rows = []
    for tokens in args.tokens:
        row = {"tokens_per_gpu": tokens, "gpus": n, "impl": backend}
        try:
            x1, cot1 = inputs(tokens)
            _, grad1 = make_fns(backend)
            row["1gpu_fwd+bwd"] = time_ms(grad1, (params, x1, cot1), args.steps)
            xg, cotg = inputs(tokens * n)
            with jax.set_mesh(mesh):
                shard = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
                p = {
                    k: shard(v, P("expert") if k.endswith(("EDF", "EFD")) else P())
                    for k, v in params.items()
                }
                xg, cotg = shard(xg, P("expert")), shard(cotg, P("expert"))
                fwd, grad = make_fns(backend, mesh=mesh)
                _, stats = fwd(p, xg, cotg)
                # one device: no exchange, hence no safe-path flag
                row["ep_safe_path"] = float(stats.get("ep_safe_path", 0.0))
                row["ep_fwd+bwd"] = time_ms(grad, (p, xg, cotg), args.steps)
            row["per_gpu_throughput_vs_1gpu"] = row["1gpu_fwd+bwd"] / row["ep_fwd+bwd"]
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def check(args):
    """GPU backends vs references: small fp32/bf16 problems (outputs + grads), then the real
    shape against the capacity-padded einsum with a capacity large enough to drop nothing."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwen3next_jax.ops import moe

    jax.config.update("jax_default_matmul_precision", "highest")  # fp32 references, not TF32
    ok = True
    backends = backends_to_run(args.backends)
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)):
        t, d, f, e, k = 512, 256, 128, 64, 4
        ks = jax.random.split(jax.random.key(7), 6)
        x = jax.random.normal(ks[0], (t, d)).astype(dtype)
        w, idx, _ = moe.router_topk(jax.random.normal(ks[1], (t, e)), k)
        wg = (jax.random.normal(ks[2], (e, d, f)) / d**0.5).astype(dtype)
        wu = (jax.random.normal(ks[3], (e, d, f)) / d**0.5).astype(dtype)
        wd = (jax.random.normal(ks[4], (e, f, d)) / f**0.5).astype(dtype)
        cot = jax.random.normal(ks[5], (t, d))

        def vg(backend, x=x, w=w, idx=idx, wg=wg, wu=wu, wd=wd, cot=cot):
            def loss(x, w, wg, wu, wd):
                y = moe.routed_experts(x, w, idx, wg, wu, wd, backend=backend)[0]
                return jnp.sum(y.astype(jnp.float32) * cot), y

            fn = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))
            (_, y), g = fn(x, w, wg, wu, wd)
            return [y, *g]

        ref = vg("dense")
        for backend in backends:
            try:
                got = vg(backend)
                errs = [
                    float(
                        jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                        / (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-30)
                    )
                    for a, b in zip(got, ref, strict=True)
                ]
                good = max(errs) < tol
            except Exception as ex:  # noqa: BLE001
                errs, good = repr(ex)[:300], False
            ok &= good
            print(
                f"check {backend} {jnp.dtype(dtype).name} small y,dx,dw,dWg,dWu,dWd rel err: "
                f"{errs} {'PASS' if good else 'FAIL'}",
                flush=True,
            )

    params = init_params(jax.random.key(0), jnp.bfloat16)
    big = 8192 if not args.dry else 256
    x, cot = inputs(big)
    fwd_ref, grad_ref = make_fns("padded", capacity_factor=4.0)
    y_ref, st = fwd_ref(params, x, cot)
    g_ref = grad_ref(params, x, cot)[0]
    print(f"check padded cf=4 dropped={float(st['dropped_fraction'])}", flush=True)
    for backend in backends:
        try:
            fwd, grad = make_fns(backend)
            y = fwd(params, x, cot)[0]
            g = grad(params, x, cot)[0]
            rel = lambda a, b: float(  # noqa: E731
                jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                / jnp.max(jnp.abs(b.astype(jnp.float32)))
            )
            errs = {"y": rel(y, y_ref), "dx": rel(g[1], g_ref[1])}
            errs.update({k: rel(g[0][k], g_ref[0][k]) for k in ("gate_EDF", "up_EDF", "down_EFD")})
            good = max(errs.values()) < 3e-2
        except Exception as ex:  # noqa: BLE001
            errs, good = repr(ex)[:300], False
        ok &= good
        print(
            f"check {backend} bf16 {big} tokens x {EXPERTS} experts vs padded: {errs} "
            f"{'PASS' if good else 'FAIL'}",
            flush=True,
        )
    del np
    return ok


def sweep(args):
    import jax

    from qwen3next_jax.ops import moe_pallas

    params = init_params(jax.random.key(0), jax.numpy.bfloat16)
    x, cot = inputs(32768 if not args.dry else args.tokens[0])
    base = {
        k: getattr(moe_pallas, k)
        for k in ("TILE_M", "TGMM_ROWS", "BLOCK_N", "BLOCK_K", "NUM_WARPS", "NUM_STAGES")
    }
    configs = [
        {},
        {"NUM_STAGES": 4},
        {"TILE_M": 64},
        {"BLOCK_K": 32, "NUM_STAGES": 5},
        {"NUM_WARPS": 4},
        {"BLOCK_N": 64, "NUM_WARPS": 4},
    ]
    backends = [b for b in args.backends if b.startswith("pallas")] or ["pallas"]
    for cfg in configs[: args.sweep_n]:
        for k, v in {**base, **cfg}.items():
            setattr(moe_pallas, k, v)
        for backend in backends:
            try:
                _, grad = make_fns(backend)
                res = {"backend": backend, "fwd+bwd": time_ms(grad, (params, x, cot), 5)}
            except Exception as e:  # noqa: BLE001
                res = {
                    "backend": backend,
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                }
            print("sweep", json.dumps({**base, **cfg}), json.dumps(res), flush=True)
    for k, v in base.items():
        setattr(moe_pallas, k, v)


def breakdown(args):
    """Times each part of the layer alone (jitted separately, so fusion across parts is lost), for
    every backend in --backends; for pallas / pallas_fused also each Pallas kernel on its own."""
    for backend in args.backends:
        breakdown_one(args, backend)


def breakdown_one(args, backend):
    import jax
    import jax.numpy as jnp

    from qwen3next_jax.ops import moe, moe_dispatch, moe_experts, moe_pallas

    f32 = jnp.float32
    tokens = args.tokens[0]
    params = init_params(jax.random.key(0), jnp.bfloat16)
    x, cot = inputs(tokens)
    wts = (params["gate_EDF"], params["up_EDF"], params["down_EFD"])
    rows, start_fn = moe_experts.row_layout(backend, tokens * TOPK, EXPERTS, None)
    fused = backend in moe_experts.FUSED_BACKENDS

    def router(p, x, impl=ROUTER_IMPL):
        return moe.router_topk(moe.router_logits(x, p["router_DE"]), TOPK, impl=impl)[:2]

    def router_loss(p, x, c_TK, impl, c_TE=None):
        """sum(w * c_TK), plus sum(probs * c_TE) (the load-balancing loss's path) if given;
        impl 'pallas_xla_bwd': the Pallas forward kernel with the XLA backward."""
        logits = moe.router_logits(x, p["router_DE"])
        if impl == "pallas_xla_bwd":
            w, _, probs = moe_pallas.router_topk(logits, TOPK, bwd="xla")
        else:
            w, _, probs = moe.router_topk(logits, TOPK, impl=impl)
        loss = jnp.sum(w * c_TK)
        return loss if c_TE is None else loss + jnp.sum(probs * c_TE)

    def place(idx):
        pl = moe_dispatch.place_by_group(idx.reshape(-1), EXPERTS, rows, start_fn)
        return pl.pos_N.reshape(tokens, TOPK), pl.src_R, pl.sizes_G, pl.start_G

    def routed(x, w_TK, idx, w):
        return moe.routed_experts(x, w_TK, idx, *w, backend=backend)[0]

    def routed_loss(x, w_TK, idx, w):
        return jnp.sum(routed(x, w_TK, idx, w).astype(f32) * cot)

    def experts(x_RD, w, sizes, start):
        return moe_experts.grouped_swiglu(x_RD, sizes, start, *w, backend=backend)

    def experts_loss(x_RD, w, sizes, start, cot_RD):
        return jnp.sum(experts(x_RD, w, sizes, start).astype(f32) * cot_RD)

    def combine(y_RD, w_TK, pos, src):
        return moe_dispatch.combine(y_RD, w_TK, pos, src, x.dtype)

    def combine_loss(y_RD, w_TK, pos, src):
        return jnp.sum(combine(y_RD, w_TK, pos, src).astype(f32) * cot)

    shared = shared_expert

    w_TK, idx = jax.jit(router)(params, x)
    pos, src, sizes, start = jax.jit(place)(idx)
    fwd, grad = make_fns(backend)
    c_TK = jnp.ones((tokens, TOPK), f32)
    parts = [
        (f"router + top-k ({impl})", jax.jit(router, static_argnums=2), (params, x, impl))
        for impl in ("xla", "pallas")
    ]
    c_TE = jax.random.normal(jax.random.key(1), (tokens, EXPERTS), f32)
    rargs = (params, x, c_TK)
    router_grad = jax.jit(jax.value_and_grad(router_loss, (0, 1)), static_argnums=3)
    names = {"xla": "xla", "pallas": "pallas", "pallas_xla_bwd": "pallas fwd, xla bwd"}
    parts += [
        (f"router + top-k fwd+bwd ({names[impl]})", router_grad, (*rargs, impl)) for impl in names
    ]
    parts += [  # with a probs cotangent too, as in the model (the load-balancing loss)
        (f"router + top-k fwd+bwd, w and probs ({names[impl]})", router_grad, (*rargs, impl, c_TE))
        for impl in names
    ]
    parts += [
        ("sort + placement", jax.jit(place), (idx,)),
        (
            "routed experts fwd (incl. placement)",
            jax.jit(routed),
            (x, w_TK, idx, wts),
        ),
        (
            "routed experts fwd+bwd (incl. placement)",
            jax.jit(jax.value_and_grad(routed_loss, (0, 1, 3))),
            (x, w_TK, idx, wts),
        ),
    ]
    if not fused:
        x_RD = jax.jit(moe_dispatch.dispatch)(x, src, pos)
        y_RD = jax.jit(experts)(x_RD, wts, sizes, start)
        cot_RD = jnp.ones_like(y_RD)
        parts += [
            ("dispatch gather", jax.jit(moe_dispatch.dispatch), (x, src, pos)),
            ("experts fwd", jax.jit(experts), (x_RD, wts, sizes, start)),
            (
                "experts fwd+bwd",
                jax.jit(jax.value_and_grad(experts_loss, (0, 1))),
                (x_RD, wts, sizes, start, cot_RD),
            ),
            ("combine fwd", jax.jit(combine), (y_RD, w_TK, pos, src)),
            (
                "combine fwd+bwd",
                jax.jit(jax.value_and_grad(combine_loss, (0, 1))),
                (y_RD, w_TK, pos, src),
            ),
        ]
    if backend in ("pallas", "pallas_fused"):
        parts += pallas_kernel_parts(moe_pallas, fused, x, cot, w_TK, pos, src, sizes, start, wts)
    parts += [
        ("shared expert fwd", jax.jit(shared), (params, x)),
        ("layer fwd", fwd, (params, x, cot)),
        ("layer fwd+bwd", grad, (params, x, cot)),
    ]
    lines = [
        f"breakdown, {tokens} tokens, backend {backend}, layer router {ROUTER_IMPL}",
        "| part | ms |",
        "|---|---|",
    ]
    for name, fn, a in parts:
        try:
            lines.append(f"| {name} | {time_ms(fn, a, args.steps):.2f} |")
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


def pallas_kernel_parts(mp, fused, x, cot, w_TK, pos, src, sizes, start, wts):
    """(name, jitted fn, args) for each Pallas kernel of the forward and backward on real
    intermediates, as the pallas (sorted copies) or pallas_fused (row-map gathers) path calls
    them. Reaches into moe_pallas's private kernels on purpose: this is where the time goes."""
    import jax

    from qwen3next_jax.ops import moe_dispatch

    wg, wu, wd = wts
    bf = x.dtype
    r = src.shape[0]
    jit = jax.jit
    tg, r0, r1 = jit(mp._tile_maps, static_argnums=2)(sizes, start, r)
    gy = cot.astype(bf)
    k_sum = jit(lambda y_RD, pos: moe_dispatch.sum_slot_rows(y_RD, pos).astype(bf))
    if fused:
        tok_R, w_R = jit(mp._row_maps)(pos, src, w_TK)
        h, g, u = jit(mp._gateup_gather, static_argnums=6)(tg, tok_R, w_R, x, wg, wu, True)
        y_RD = jit(mp._down)(tg, h, wd)
        dg, du, _ = jit(mp._down_bwd_gather)(tg, tok_R, w_R, gy, wd, g, u)
        dx_RD = jit(mp._dx)(tg, dg, du, wg, wu)
        tgmm = jit(mp._tgmm, static_argnums=(4, 6))
        return [
            ("fused: row maps (tok_R, w_R)", jit(mp._row_maps), (pos, src, w_TK)),
            (
                "fused: gate-up gather, h only (fwd)",
                jit(lambda *a: mp._gateup_gather(*a, False)),
                (tg, tok_R, w_R, x, wg, wu),
            ),
            (
                "fused: gate-up gather + g, u residuals",
                jit(lambda *a: mp._gateup_gather(*a, True)),
                (tg, tok_R, w_R, x, wg, wu),
            ),
            ("down", jit(mp._down), (tg, h, wd)),
            ("K-row sum (combine fwd)", k_sum, (y_RD, pos)),
            (
                "fused: down bwd, gathers gy (+ dL/dw)",
                jit(mp._down_bwd_gather),
                (tg, tok_R, w_R, gy, wd, g, u),
            ),
            ("dx kernel", jit(mp._dx), (tg, dg, du, wg, wu)),
            ("K-row sum (dx)", k_sum, (dx_RD, pos)),
            (
                "fused: dW_down tgmm, gathers gy",
                lambda *a: tgmm(*a, tok_R, (False, True)),
                (r0, r1, h, [gy], wd.dtype),
            ),
            (
                "fused: dW_gate/up tgmm, gathers x",
                lambda *a: tgmm(*a, tok_R, (True, False)),
                (r0, r1, x, [dg, du], wg.dtype),
            ),
        ]
    x_RD = jit(moe_dispatch.dispatch)(x, src, pos)
    h, g, u = jit(mp._gateup)(tg, x_RD, wg, wu)
    dy_RD = jit(moe_dispatch.dispatch)(gy, src, pos)  # stands in for the combine's backward rows
    dg, du = jit(mp._down_bwd)(tg, dy_RD, wd, g, u)
    tgmm = jit(mp._tgmm, static_argnums=4)
    return [
        ("gate-up (h, g, u)", jit(mp._gateup), (tg, x_RD, wg, wu)),
        ("down", jit(mp._down), (tg, h, wd)),
        ("down bwd", jit(mp._down_bwd), (tg, dy_RD, wd, g, u)),
        ("dx kernel", jit(mp._dx), (tg, dg, du, wg, wu)),
        ("K-row sum (dx)", k_sum, (jit(mp._dx)(tg, dg, du, wg, wu), pos)),
        ("dW_down tgmm", tgmm, (r0, r1, h, [dy_RD], wd.dtype)),
        ("dW_gate/up tgmm", tgmm, (r0, r1, x_RD, [dg, du], wg.dtype)),
    ]


def table(rows, hf, mm_rate):
    lines = [
        f"bf16 matmul {MATMUL_N}^3 measured in this run: {mm_rate:.0f} TFLOP/s",
        "",
        "| tokens | implementation | fwd ms | fwd TFLOP/s | fwd % mm | fwd+bwd ms | "
        "fwd+bwd TFLOP/s | fwd+bwd % mm | fwd+bwd vs HF | fwd+bwd ms, host sync per call "
        "| traced batch: wall / GPU span / GPU busy ms (--trace) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt_ms(r, *keys):
        return " / ".join(f"{r[k]:.2f}" if k in r else "-" for k in keys)

    def cells(t, fwd, fb, hf_fb):
        out = []
        for mode, ms in (("fwd", fwd), ("fwd+bwd", fb)):
            tf = expert_flops(t, mode) / (ms * 1e-3) / 1e12
            out += [f"{ms:.2f}", f"{tf:.0f}", f"{100 * tf / mm_rate:.0f}%"]
        out.append(f"{hf_fb / fb:.2f}x" if hf_fb else "")
        return out

    for t in sorted({r["tokens"] for r in rows} | {int(k) for k in hf if k.isdigit()}):
        h = hf.get(str(t), {})
        hf_fb = h.get("fwd+bwd")
        if "fwd" in h:
            lines.append(
                "| "
                + " | ".join(
                    [
                        str(t),
                        "HF Qwen3NextSparseMoeBlock (torch)",
                        *cells(t, h["fwd"], h["fwd+bwd"], None),
                        "-",
                        "-",
                    ]
                )
                + " |"
            )
        for r in rows:
            if r["tokens"] != t:
                continue
            if "error" in r:
                lines.append(f"| {t} | {r['impl']} | failed: {r['error']} ||||||||")
            else:
                cols = [
                    str(t),
                    r["impl"],
                    *cells(t, r["fwd"], r["fwd+bwd"], hf_fb),
                    fmt_ms(r, "fwd+bwd_sync"),
                    fmt_ms(r, "fwd+bwd_traced", "fwd+bwd_window", "fwd+bwd_busy"),
                ]
                lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def ep_table(rows):
    lines = [
        "| tokens/GPU | GPUs | backend | 1 GPU fwd+bwd ms | EP fwd+bwd ms | per-GPU throughput "
        "vs 1 GPU | safe path |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['tokens_per_gpu']} | {r['gpus']} | {r['impl']} | failed: {r['error']} ||||"
            )
        else:
            lines.append(
                f"| {r['tokens_per_gpu']} | {r['gpus']} | {r['impl']} | "
                f"{r['1gpu_fwd+bwd']:.2f} | {r['ep_fwd+bwd']:.2f} | "
                f"{r['per_gpu_throughput_vs_1gpu']:.2f} | {r['ep_safe_path']:.0f} |"
            )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument(
        "--backends",
        nargs="+",
        default=["pallas", "pallas_fused", "tokamax"],
        help="routed_experts backends (pallas = sorted row copies, pallas_fused = row-map gathers)",
    )
    ap.add_argument(
        "--padded-cf",
        type=float,
        default=1.25,
        help="also time the capacity-padded einsum at this factor (0 = skip)",
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ep", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-n", type=int, default=6)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument(
        "--trace",
        action="store_true",
        help="also profile one batch of fwd+bwd calls: GPU busy vs wall time per call (GPU only)",
    )
    ap.add_argument("--hf-experts", default="grouped_mm", help="transformers experts backend")
    ap.add_argument(
        "--breakdown", action="store_true", help="time the layer's parts (1st --tokens)"
    )
    ap.add_argument(
        "--dry",
        action="store_true",
        help="tiny shapes (hidden 256, 16 experts, 256 tokens, 1 step, no HF): runs the code path "
        "on any platform, Pallas in interpret mode off GPU; the numbers mean nothing",
    )
    ap.add_argument(
        "--router",
        choices=("xla", "pallas"),
        default="xla",
        help="router softmax + top-k in the layer: XLA ops or the fused Pallas kernel",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODULE.NAME=VALUE",
        help="override a qwen3next_jax.ops module constant first (as bench/kernel_profile.py)",
    )
    ap.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global ROUTER_IMPL
    ROUTER_IMPL = args.router
    if args.set:
        from kernel_profile import apply_overrides  # bench/ is on sys.path

        apply_overrides(args.set)
        print("overrides:", args.set, flush=True)
    if args.hf_child:
        return hf_main(args.tokens, args.steps, args.hf_experts)
    if args.dry:
        set_dry_shapes()
        args.tokens, args.steps, args.no_hf, args.padded_cf = [256], 1, True, 0
        args.backends = [b for b in args.backends if b != "tokamax"]

    out_dir = os.environ.get("OUT", "./out")
    os.makedirs(out_dir, exist_ok=True)
    if args.check:
        sys.exit(0 if check(args) else 1)
    if args.sweep:
        return sweep(args)
    if args.breakdown:
        return breakdown(args)
    hf = {} if (args.no_hf or args.ep) else run_hf(args.tokens, args.steps, args.hf_experts)
    print("HF:", json.dumps(hf), flush=True)

    import jax

    print(f"jax {jax.__version__}, devices: {jax.devices()}", flush=True)
    mm_rate = matmul_tflops(args.steps)
    print(f"matmul {MATMUL_N}^3 bf16: {mm_rate:.0f} TFLOP/s", flush=True)
    if args.ep:
        rows = bench_ep(args)
        md = ep_table(rows)
    else:
        rows = bench_single(args, mm_rate)
        md = table(rows, hf, mm_rate)
    with open(os.path.join(out_dir, "moe_bench.md"), "w") as fh:
        fh.write(md + "\n")
    with open(os.path.join(out_dir, "moe_bench.json"), "w") as fh:
        json.dump({"rows": rows, "hf": hf, "matmul_tflops": mm_rate}, fh, indent=1)
    print(md)


if __name__ == "__main__":
    main()
