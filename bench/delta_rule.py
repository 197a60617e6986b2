"""Gated DeltaNet core on one GPU: pure-JAX chunk path, Pallas kernels and fla, same inputs.

Qwen3-Next shapes: H = 16 q/k heads, HV = 32 value heads, Dk = Dv = 128, chunk 64; q, k, v, beta
bf16 (q, k L2-normalised, beta = sigmoid(N(0,1))), g = logsigmoid(U(0,1)) in fp32 (the model
computes g in fp32, spec §2.4.3). fwd = o only; fwd+bwd = o and the gradients of all five
inputs for a fixed random cotangent (both frameworks compute o in it too). JAX is timed in
batches of 5 calls issued back to back with one jax.block_until_ready per batch, after warm-up
(median over batches, per call); fla with triton.testing.do_bench (device events, median).

    PYTHONUNBUFFERED=1 python bench/delta_rule.py [--shapes 1x8192,1x32768,4x4096,8x4096]
        [--impls pallas,fla,chunk,pallas_opt] [--opt-shapes 1x32768] [--check]
        [--breakdown 1x32768] [--kvariants 1x32768] [--variants 1x32768] [--budget 380]

Writes $OUT/delta_rule_bench.md (the table) and $OUT/delta_rule_bench.json; prints the table
last. Sections that fail are logged and skipped; --budget (seconds) skips what would start late.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # leave room for PyTorch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _import_ops():
    """The two op modules; bypasses the package __init__ if another part of it fails to import."""
    try:
        from qwen3next_jax.ops import delta_rule, delta_rule_pallas
    except Exception:  # noqa: BLE001
        import types

        for name in [m for m in sys.modules if m.startswith("qwen3next_jax")]:
            del sys.modules[name]
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "qwen3next_jax")
        pkg = types.ModuleType("qwen3next_jax")
        pkg.__path__ = [root]
        sys.modules["qwen3next_jax"] = pkg
        from qwen3next_jax.ops import delta_rule, delta_rule_pallas
    return delta_rule, delta_rule_pallas


dr, drp = _import_ops()
H, HV, K, V = 16, 32, 128, 128
OUT = os.environ.get("OUT", "/tmp/delta_rule_bench")
START = time.time()
LOG = []
INNER = 5  # --inner: calls per timed batch of time_jax
INTERPRET = False  # --interpret: Pallas kernels interpreted, for a dry run of this script on CPU


def log(*a):
    msg = " ".join(str(x) for x in a)
    print(msg, flush=True)
    LOG.append(msg)


@functools.cache
def _token_pool(n):
    """float32 numpy inputs for n tokens, drawn once; every shape reshapes a prefix of them."""
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(rng.standard_normal((n, H, K), np.float32))
    k = unit(rng.standard_normal((n, H, K), np.float32))
    v = rng.standard_normal((n, HV, V), np.float32)
    g = -np.log1p(np.exp(-rng.uniform(0, 1, (n, HV)))).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((n, HV))))).astype(np.float32)
    do = rng.standard_normal((n, HV, V), np.float32)
    return q, k, v, g, beta, do


def make_inputs(B, T):
    """q, k, v, g, beta, do for B x T tokens (float32; q, k, v, beta, do are rounded to bf16
    identically by each framework)."""
    pool = _token_pool(max(B * T, 32768))
    return tuple(np.ascontiguousarray(x[: B * T].reshape(B, T, *x.shape[1:])) for x in pool)


def to_jax(arrs):
    q, k, v, g, beta, do = arrs
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    return bf(q), bf(k), bf(v), jnp.asarray(g), bf(beta), bf(do)


def time_jax(f, *args, reps=20, warmup=2, inner=None):
    """Median over reps of the mean time of `inner` calls issued back to back (one host sync per
    batch, as a training loop dispatches): GPU time per call including launch gaps, without the
    ~0.1-0.6 ms of one host round trip per call that a synchronising timer adds (fla's
    do_bench times with device events, which also leave it out)."""
    inner = inner or INNER
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        outs = [f(*args) for _ in range(inner)]
        jax.block_until_ready(outs)
        ts.append((time.perf_counter() - t) / inner)
    return 1e3 * float(np.median(ts))


def jax_impl(name, tuning=None):
    if name == "pallas_opt":
        tuning = {**OPT, **(tuning or {})}
    if name == "pallas_tuned":
        tuning = {**TUNED, **(tuning or {})}
    if name == "pallas_prev":  # session 2's final config: the inverse recomputed in the backward
        tuning = {**PREV, **(tuning or {})}
    if name.startswith("pallas_v"):  # --variant-tunings entry number N of "pallas_vN"
        tuning = {**VARIANT_TUNINGS[int(name[len("pallas_v") :])], **(tuning or {})}
    if name == "chunk":
        return lambda q, k, v, g, beta: dr.chunk_gated_delta_rule(q, k, v, g, beta)[0]
    return lambda q, k, v, g, beta: drp.pallas_gated_delta_rule(
        q, k, v, g, beta, tuning=tuning, interpret=INTERPRET
    )[0]


def jax_fns(fwd):
    """Jitted forward, and forward+backward returning (o, gradients): o is returned so that XLA
    keeps the output kernel, which a gradient-only program drops (o feeds no gradient) and which
    fla's timed forward+backward also runs (until 2026-11-29 the fwd+bwd rows lacked it)."""
    f = jax.jit(fwd)

    def fwd_bwd(q, k, v, g, beta, do):
        o, vjp = jax.vjp(fwd, q, k, v, g, beta)
        return o, vjp(do)

    return f, jax.jit(fwd_bwd)


def rel_max(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------


def check(tuning=None):
    """Pallas (launch config tuning) vs the pure-JAX chunk path (fp32 on the same bf16-rounded
    values), segments."""
    rng = np.random.default_rng(1)
    # HV 16: a power of two >= 16, so the gates kernel runs too (with HV 4 XLA does the gates).
    B, T, h, hv, d = 2, 300, 8, 16, K
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(rng.standard_normal((B, T, h, d))).astype(np.float32)
    k = unit(rng.standard_normal((B, T, h, d))).astype(np.float32)
    v = rng.standard_normal((B, T, hv, d)).astype(np.float32)
    g = -rng.uniform(0, 0.7, (B, T, hv)).astype(np.float32)
    beta = rng.uniform(0.05, 0.95, (B, T, hv)).astype(np.float32)
    s0 = rng.standard_normal((B, hv, d, d)).astype(np.float32)
    seg = np.zeros((B, T), np.int32)
    seg[0, :40], seg[0, 40:128], seg[0, 128:200], seg[0, 210:] = 1, 2, 3, 4
    seg[1, 5:150], seg[1, 150:] = 5, 6

    def vg(backend):
        def loss(q, k, v, g, beta, s0):
            kw = dict(initial_state=s0, segment_ids=seg)
            if backend == "chunk":
                o, s = dr.gated_delta_rule(q, k, v, g, beta, backend=backend, **kw)
            else:
                o, s = drp.pallas_gated_delta_rule(
                    q, k, v, g, beta, interpret=INTERPRET, tuning=tuning, **kw
                )
            return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(jnp.cos(s)), (o, s)

        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))

    # Compiled, the kernels take 16-bit inputs only; interpreted (a CPU dry run) also float32.
    for dtype in (jnp.float32, jnp.bfloat16) if INTERPRET else (jnp.bfloat16,):
        cast = [jnp.asarray(x, dtype) for x in (q, k, v)]
        args = (*cast, jnp.asarray(g), jnp.asarray(beta, dtype), jnp.asarray(s0))
        up = [jnp.asarray(a, jnp.float32) for a in args]
        (_, (o_r, s_r)), g_r = vg("chunk")(*up)
        (_, (o_p, s_p)), g_p = vg("pallas")(*args)
        errs = [rel_l2(o_p, o_r), rel_l2(s_p, s_r)] + [
            rel_l2(a, b) for a, b in zip(g_p, g_r, strict=True)
        ]
        names = ["o", "state", "dq", "dk", "dv", "dg", "dbeta", "dstate0"]
        log(
            f"check {jnp.dtype(dtype).name} B{B} T{T} segments, tuning {tuning}, "
            "rel L2 err pallas vs chunk:"
        )
        log("   " + " ".join(f"{n}={e:.2e}" for n, e in zip(names, errs, strict=True)))
        finite = all(np.isfinite(np.asarray(x)).all() for x in (o_p, s_p, *g_p))
        pad_zero = bool(np.all(np.asarray(o_p)[0, 200:210] == 0))
        log(f"   all finite: {finite}; padding outputs zero: {pad_zero}")


def bench_jax(name, B, T, tuning=None, reps=20):
    q, k, v, g, beta, do = to_jax(make_inputs(B, T))
    f, fb = jax_fns(jax_impl(name, tuning))
    t0 = time.time()
    o = jax.block_until_ready(f(q, k, v, g, beta))
    jax.block_until_ready(fb(q, k, v, g, beta, do))
    compile_s = time.time() - t0
    fwd = time_jax(f, q, k, v, g, beta, reps=reps)
    fwdbwd = time_jax(fb, q, k, v, g, beta, do, reps=reps)
    grads = fb(q, k, v, g, beta, do)[1]
    return dict(fwd=fwd, fwdbwd=fwdbwd, compile_s=compile_s), np.asarray(o, np.float32), grads


def fla_setup():
    import fla.ops.common.chunk_o as chunk_o
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    # fla 0.6.0 refuses its gated backward (chunk_bwd_dqkwg) on Hopper with Triton < 3.7.1
    # (fla #640: wrong results there). Lifted to time it; its gradients are not trusted.
    chunk_o.TRITON_ABOVE_3_7_1 = True
    return torch, chunk_gated_delta_rule


def bench_fla(B, T):
    import triton

    torch, fla_fn = fla_setup()
    q, k, v, g, beta, do = make_inputs(B, T)
    dev = "cuda"
    bf = lambda x: torch.from_numpy(x).to(dev).to(torch.bfloat16)
    tq, tk, tv, tbeta, tdo = bf(q), bf(k), bf(v), bf(beta), bf(do)
    tg = torch.from_numpy(g).to(dev)
    with torch.no_grad():
        o = fla_fn(tq, tk, tv, tg, tbeta)[0]
        fwd = triton.testing.do_bench(
            lambda: fla_fn(tq, tk, tv, tg, tbeta), warmup=25, rep=200, return_mode="median"
        )
    leaves = [x.clone().requires_grad_(True) for x in (tq, tk, tv, tg, tbeta)]

    def fb():
        out = fla_fn(*leaves)[0]
        out.backward(tdo)

    fb()
    grads = [x.grad.float().cpu().numpy() for x in leaves]
    fwdbwd = triton.testing.do_bench(
        fb, warmup=25, rep=200, grad_to_none=leaves, return_mode="median"
    )
    return dict(fwd=fwd, fwdbwd=fwdbwd), o.float().cpu().numpy(), grads


def profile_fla(B, T, reps=5):
    """fla's forward+backward kernel by kernel (torch profiler, CUDA time per call, ms)."""
    from torch.profiler import ProfilerActivity, profile

    torch, fla_fn = fla_setup()
    q, k, v, g, beta, do = make_inputs(B, T)
    bf = lambda x: torch.from_numpy(x).to("cuda").to(torch.bfloat16)
    tq, tk, tv, tbeta, tdo = bf(q), bf(k), bf(v), bf(beta), bf(do)
    tg = torch.from_numpy(g).cuda()
    leaves = [x.clone().requires_grad_(True) for x in (tq, tk, tv, tg, tbeta)]

    def fb():
        for x in leaves:
            x.grad = None
        fla_fn(*leaves)[0].backward(tdo)

    fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fb()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / 1e3 / reps, e.count // reps, e.key))
    rows.sort(reverse=True)
    log(f"fla fwd+bwd kernels at {B}x{T} (ms per call, launches per call):")
    for ms, n, name in rows[:20]:
        log(f"   {ms:8.3f} ms  x{n}  {name[:90]}")
    log(f"   total {sum(r[0] for r in rows):.3f} ms")
    return rows


# Launch variants timed kernel by kernel (--kvariants): (tuning, kernels it changes).
KVARIANTS = [
    (dict(bv_seq=64), ("fwd state pass", "bwd state pass")),
    (dict(bv_seq=16), ("fwd state pass", "bwd state pass")),
    (dict(stages_seq=3), ("fwd state pass", "bwd state pass")),
    (dict(bv_dqk=128), ("bwd dq/dk (read-out)",)),
    (dict(warps_group=4), ("bwd dq/dk (read-out)",)),
    (dict(warps_wy=4), ("bwd WY (dk,dv,dbeta,dg)",)),
    (dict(warps_intra=8), ("fwd intra (W,U)", "bwd intra (W,U[,Tinv])")),
    (dict(split_intra=True), ("fwd intra (W,U)", "bwd intra (W,U[,Tinv])")),
    (dict(split_intra=True, warps_par=8), ("fwd intra (W,U)",)),
    (dict(dvl_in_state=True), ("bwd state pass", "bwd dv_local (+v_new)")),
    (dict(dvl_in_state=True, bv_seq=16), ("bwd state pass",)),
    (dict(bv_par=128), ("fwd output", "bwd dv_local (+v_new)")),
]

# --autotune BxT: greedy per-kernel choice, group by group, each candidate merged onto the best
# so far; the first candidate of each group is the current config. The "pallas_tuned" rows
# then run with the result.
TUNE_GROUPS = [
    # Session 4 (RESULTS.md): run A tried inv_power, inv_dot="tf32x3", stages_seq=4,
    # warps_seq=8, bv_seq=64, fuse_bwd and warps_par=8; run B solve_hv, warps_intra=2 and
    # bf16 partials. The winners are the defaults now; these stay as the next run's checks.
    (
        ("fwd intra (W,U)", "bwd intra (W,U[,Tinv])"),
        [{}, dict(solve_hv=False), dict(warps_intra=4)],
    ),
    (
        ("bwd dq/dk (read-out)", "bwd WY (dk,dv,dbeta,dg)"),
        [{}, dict(partials="float32"), dict(fuse_bwd=True)],
    ),
]
# session 2's final config (the default before session 4)
PREV = dict(save_tinv=False, inv_power=False, solve_hv=False, warps_intra=4, partials="float32")
TUNED = {}
VARIANT_TUNINGS = []  # --variant-tunings: the options of impls pallas_v0, pallas_v1, ...


def autotune(B, T, reps):
    base = dict(breakdown(B, T, None, reps))
    groups = [(names, list(cands)) for names, cands in TUNE_GROUPS]
    best = {}
    for names, cands in groups:
        times = []
        for i, c in enumerate(cands):
            c, cnames = c if isinstance(c, tuple) else (c, names)  # (tuning, rows it times)
            cands[i] = c
            if not c:
                bd = base if not best else dict(breakdown(B, T, best, reps, cnames))
            else:
                log(f"autotune candidate {c}:")
                bd = dict(breakdown(B, T, {**best, **c}, reps, cnames))
            times.append(sum(bd[n] for n in cnames))
        i = min(range(len(cands)), key=lambda i: times[i])
        if times[i] < 0.98 * times[0]:  # keep the current config unless 2% faster
            best.update(cands[i])
        pairs = zip(cands, times, strict=True)
        log(f"autotune {names}: " + ", ".join(f"{c}={t:.3f}" for c, t in pairs))
        log(f"autotune best so far: {best}")
    TUNED.clear()
    TUNED.update(best)
    return best


# Tuning of the "pallas_opt" rows (--impls ...,pallas_opt; shapes from --opt-shapes).
OPT = dict(split_intra=True, dvl_in_state=True)


@functools.cache
def _intermediates(B, T):
    """Inputs and real intermediates of the Pallas path (default launch config), once a shape."""
    q, k, v, g, beta, do = to_jax(make_inputs(B, T))
    q_, k_, v_, gamma, beta_, seg = jax.jit(
        lambda q, k, v, g, beta: dr._chunk_prepare(q, k, v, g, beta, None, None, 64)
    )(q, k, v, g, beta)
    gamma, beta_ = jnp.swapaxes(gamma, 1, 2), jnp.swapaxes(beta_, 1, 2)
    cfg = drp._Cfg(B, q_.shape[1], H, HV, K, V, 64, K**-0.5, "bfloat16", INTERPRET)
    s0 = jnp.zeros((B, HV, K, V), jnp.float32)
    do_ = jnp.pad(do, [(0, 0), (0, q_.shape[1] - T), (0, 0), (0, 0)])
    j = lambda fn: jax.jit(functools.partial(fn, cfg))
    w, u, tinv = jax.jit(lambda *a: drp._intra(cfg, *a, with_tinv=True))(k_, v_, gamma, beta_, seg)
    states, vn, final = j(drp._state_fwd)(w, u, k_, gamma, seg, s0)
    vn2, dvl = j(drp._dv_local)(q_, k_, w, u, states, gamma, seg, do_)
    dst, dvn, ds0 = j(drp._state_bwd)(q_, k_, w, gamma, seg, do_, dvl, final)
    return dict(
        q=q, k=k, v=v, g=g, beta=beta, q_=q_, k_=k_, v_=v_, gamma=gamma, beta_=beta_, seg=seg,
        s0=s0, do_=do_, w=w, u=u, tinv=tinv, states=states, vn=vn, final=final, vn2=vn2,
        dvl=dvl, dst=dst, dvn=dvn, Tp=q_.shape[1],
    )  # fmt: skip


def breakdown(B, T, tuning=None, reps=20, only=None):
    """Per-kernel times of the Pallas path (each kernel jitted alone on real intermediates).

    only: names of the kernels to time (None: all). Kernels on value-head grids include the
    XLA sum of their per-value-head dq / dk."""
    x = _intermediates(B, T)
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
    q_, k_, v_, gamma, beta_, seg = x["q_"], x["k_"], x["v_"], x["gamma"], x["beta_"], x["seg"]
    s0, do_, w, u, tinv, states = x["s0"], x["do_"], x["w"], x["u"], x["tinv"], x["states"]
    vn, final, vn2, dvl, dst, dvn = x["vn"], x["final"], x["vn2"], x["dvl"], x["dst"], x["dvn"]
    cfg = drp._Cfg(B, x["Tp"], H, HV, K, V, 64, K**-0.5, "bfloat16", INTERPRET, **(tuning or {}))
    j = lambda fn: jax.jit(functools.partial(fn, cfg))
    # The forward's intra also writes the inverse when the backward keeps it; the backward's
    # reruns only the W, U products then.
    intra_fwd = jax.jit(lambda *a: drp._intra(cfg, *a, with_tinv=cfg.save_tinv))
    if cfg.save_tinv:
        intra_bwd = jax.jit(lambda *a: drp._wu(cfg, *a, tinv))
    else:
        intra_bwd = jax.jit(lambda *a: drp._intra(cfg, *a, with_tinv=True))
    gsum = lambda x: x.reshape(*x.shape[:2], H, HV // H, x.shape[-1]).sum(3, dtype=jnp.float32)

    def dqk(*a):
        dq, dk, dg = drp._dqk(cfg, *a)
        return (gsum(dq), gsum(dk), dg) if cfg.dqk_hv else (dq, dk, dg)

    def wy(*a):
        dk, dv, db, dg = drp._wy_bwd(cfg, *a)
        return (gsum(dk) if cfg.wy_hv else dk), dv, db, dg

    def fused(*a):
        dq, dk, dv, db, dg = drp._bwd_fused(cfg, *a)
        return gsum(dq), gsum(dk), dv, db, dg

    steps = [
        ("fwd intra (W,U)", intra_fwd, (k_, v_, gamma, beta_, seg)),
        ("inverse kernel alone", j(drp._solve), (k_, gamma, beta_, seg)),
        ("fwd state pass", j(drp._state_fwd), (w, u, k_, gamma, seg, s0)),
        (
            "fwd output",
            jax.jit(lambda *a: drp._output(cfg, *a, jnp.bfloat16)),
            (q_, k_, states, vn, gamma, seg),
        ),
        ("bwd intra (W,U[,Tinv])", intra_bwd, (k_, v_, gamma, beta_, seg)),
        ("bwd dv_local (+v_new)", j(drp._dv_local), (q_, k_, w, u, states, gamma, seg, do_))
        if not cfg.dvl_in_state
        else ("bwd dv_local (+v_new)", j(drp._vn), (w, u, states)),
        (
            "bwd state pass",
            j(drp._state_bwd),
            (q_, k_, w, gamma, seg, do_, None if cfg.dvl_in_state else dvl, final),
        ),
        ("bwd dq/dk (read-out)", jax.jit(dqk), (q_, k_, gamma, seg, states, dst, vn2, do_)),
        (
            "bwd WY (dk,dv,dbeta,dg)",
            jax.jit(wy),
            (k_, v_, gamma, beta_, seg, w, u, tinv, states, dvn),
        ),
        (
            "bwd dq/dk + WY fused",
            jax.jit(fused),
            (q_, k_, v_, gamma, beta_, seg, w, u, tinv, states, dst, vn2, do_, dvn),
        ),
        (
            "gates kernel fwd+bwd",
            jax.jit(
                lambda g, b, seg, ct: jax.vjp(lambda g, b: drp._gates(cfg, g, b, seg), g, b)[1](ct)
            ),
            (g, beta.astype(jnp.float32), seg, (gamma, beta_)),
        ),
        (
            "prepare (mask/pad/cumsum)",
            jax.jit(lambda *a: dr._chunk_prepare(*a, None, None, 64)),
            (q, k, v, g, beta),
        ),
    ]
    out = []
    for name, fn, args in steps:
        if only is not None and name not in only:
            continue
        ms = time_jax(fn, *args, reps=reps)
        out.append((name, ms))
        log(f"   {name:28s} {ms:8.3f} ms")
    return out


# ------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="1x8192,1x32768,4x4096,8x4096")
    p.add_argument("--impls", default="pallas,fla,chunk")
    p.add_argument("--check", action="store_true")
    p.add_argument("--breakdown", default="")
    p.add_argument("--variants", default="")
    p.add_argument("--opt-shapes", default="1x32768,8x4096", help="shapes of pallas_opt rows")
    p.add_argument("--kvariants", default="", help="BxT: time KVARIANTS kernel by kernel")
    p.add_argument("--autotune", default="", help="BxT: choose TUNE_GROUPS, then pallas_tuned")
    p.add_argument("--fla-profile", default="", help="BxT: fla's kernels, torch profiler")
    p.add_argument("--tuning", default="", help="JSON dict of _Cfg options for pallas_tuned")
    p.add_argument(
        "--variant-tunings",
        default="[]",
        help="JSON list of _Cfg option dicts: impls pallas_v0, pallas_v1, ... (rows vs fla)",
    )
    p.add_argument("--check-variant", type=int, default=-1, help="--check that variant too")
    p.add_argument("--budget", type=float, default=380.0)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--inner",
        type=int,
        default=5,
        help="JAX calls per timed batch (one host sync each; more amortises the batch's start)",
    )
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--dims", default="16,32,128,128", help="H,HV,Dk,Dv (small for a dry run)")
    args = p.parse_args()
    global INTERPRET, INNER, H, HV, K, V
    INTERPRET, INNER = args.interpret, args.inner
    H, HV, K, V = (int(x) for x in args.dims.split(","))
    os.makedirs(OUT, exist_ok=True)
    if args.tuning:
        TUNED.update(json.loads(args.tuning))
    VARIANT_TUNINGS.extend(json.loads(args.variant_tunings))
    late = lambda: time.time() - START > args.budget
    log(f"jax {jax.__version__} devices {jax.devices()} python {platform.python_version()}")
    try:
        import torch
        import triton

        gpu = torch.cuda.get_device_name()
        log(f"torch {torch.__version__} triton {triton.__version__} gpu {gpu}")
    except Exception as e:  # noqa: BLE001
        log(f"torch/triton unavailable: {e!r}")
    results = {}

    def guarded(label, fn, *a, **kw):
        if late():
            log(f"SKIP {label}: past the {args.budget:.0f} s budget")
            return None
        t = time.time()
        try:
            r = fn(*a, **kw)
            log(f"done {label} in {time.time() - t:.1f} s (t={time.time() - START:.0f} s)")
            return r
        except Exception:  # noqa: BLE001
            log(f"FAILED {label}:\n{traceback.format_exc()}")
            return None

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    impls = args.impls.split(",")
    fla_outs = {}

    opt_shapes = [tuple(int(x) for x in s.split("x")) for s in args.opt_shapes.split(",") if s]

    def run_impl(impl):
        for B, T in opt_shapes if impl == "pallas_opt" else shapes:
            if impl == "fla":
                r = guarded(f"fla {B}x{T}", bench_fla, B, T)
            else:
                reps = args.reps if impl != "chunk" else max(3, args.reps // 4)
                r = guarded(f"{impl} {B}x{T}", bench_jax, impl, B, T, reps=reps)
            if r is None:
                continue
            res, o, grads = r
            results[(impl, B, T)] = res
            log(f"   {impl} {B}x{T}: fwd {res['fwd']:.3f} ms, fwd+bwd {res['fwdbwd']:.3f} ms")
            if impl == "fla":
                fla_outs[(B, T)] = (o, grads)
            elif (B, T) in fla_outs:
                o_fla, g_fla = fla_outs[(B, T)]
                res["o_relmax_fla"] = rel_max(o, o_fla)
                res["o_rell2_fla"] = rel_l2(o, o_fla)
                res["grad_rell2_fla"] = [
                    rel_l2(np.asarray(a, np.float32), b) for a, b in zip(grads, g_fla, strict=True)
                ]
                log(
                    f"   vs fla: o rel-max {res['o_relmax_fla']:.2e} "
                    f"rel-L2 {res['o_rell2_fla']:.2e};"
                    " grads (q,k,v,g,beta) rel-L2 "
                    + " ".join(f"{x:.1e}" for x in res["grad_rell2_fla"])
                )

    # Order by importance within the time budget: fla first (so the JAX paths are compared
    # with its outputs as they finish), Pallas, the check, its breakdown, kernel variants,
    # pallas_opt, pure JAX, tuning variants.
    if args.autotune:
        B, T = (int(x) for x in args.autotune.split("x"))
        log(f"autotune pallas {B}x{T}:")
        tuned = guarded(f"autotune {args.autotune}", autotune, B, T, args.reps)
        log(f"TUNED = {tuned}")
        if args.check:  # the tuned config's check before its rows
            guarded("check", check, TUNED)
    for impl in [i for i in impls if i == "fla"] + [
        i for i in impls if i not in ("fla", "chunk", "pallas_opt")
    ]:
        run_impl(impl)
    if args.check and not args.autotune:
        guarded("check", check)
        if args.check_variant >= 0:
            guarded("check variant", check, VARIANT_TUNINGS[args.check_variant])
    if args.fla_profile:
        B, T = (int(x) for x in args.fla_profile.split("x"))
        guarded(f"fla profile {args.fla_profile}", profile_fla, B, T)
    bd = {}
    for s in [s for s in args.breakdown.split(",") if s]:
        B, T = (int(x) for x in s.split("x"))
        log(f"breakdown pallas {B}x{T}:")
        bd[s] = guarded(f"breakdown {s}", breakdown, B, T, reps=args.reps)
    for s in [s for s in args.kvariants.split(",") if s]:
        B, T = (int(x) for x in s.split("x"))
        for tuning, names in KVARIANTS:
            log(f"kernel variant {tuning} {s}:")
            r = guarded(f"kvariant {tuning} {s}", breakdown, B, T, tuning, args.reps, names)
            bd[f"{s} {tuning}"] = r
    if "pallas_opt" in impls:
        run_impl("pallas_opt")
    if "chunk" in impls:
        run_impl("chunk")
    variants = [dict(gates_kernel=False)]
    var_res = []
    for s in [s for s in args.variants.split(",") if s]:
        B, T = (int(x) for x in s.split("x"))
        for tuning in variants:
            r = guarded(f"variant {tuning} {s}", bench_jax, "pallas", B, T, tuning, args.reps)
            if r is not None:
                var_res.append((s, tuning, r[0]))
                fwd, fb = r[0]["fwd"], r[0]["fwdbwd"]
                log(f"   variant {tuning}: fwd {fwd:.3f} ms, fwd+bwd {fb:.3f} ms")

    lines = [
        "| B x T | impl | fwd ms | fwd+bwd ms | fwd ns/tok | fwd+bwd ns/tok | fwd / fla | "
        "fwd+bwd / fla | o max rel diff to fla |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for B, T in shapes:
        fla = results.get(("fla", B, T))
        for impl in impls:
            r = results.get((impl, B, T))
            if r is None:
                lines.append(f"| {B}x{T} | {impl} | failed/skipped | | | | | | |")
                continue
            ntok = B * T
            ratio = {key: f"{r[key] / fla[key]:.2f}" if fla else "n/a" for key in ("fwd", "fwdbwd")}
            diff = f"{r['o_relmax_fla']:.1e}" if "o_relmax_fla" in r else "-"
            lines.append(
                f"| {B}x{T} | {impl} | {r['fwd']:.3f} | {r['fwdbwd']:.3f} | "
                f"{1e6 * r['fwd'] / ntok:.0f} | {1e6 * r['fwdbwd'] / ntok:.0f} | "
                f"{ratio['fwd']} | {ratio['fwdbwd']} | {diff} |"
            )
    table = "\n".join(lines)
    with open(os.path.join(OUT, "delta_rule_bench.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(OUT, "delta_rule_bench.json"), "w") as f:
        json.dump(
            dict(
                results={f"{i} {b}x{t}": r for (i, b, t), r in results.items()},
                breakdown=bd,
                variants=[(s, t, r) for s, t, r in var_res],
                log=LOG,
            ),
            f,
            indent=1,
            default=str,
        )
    print(f"\ntotal {time.time() - START:.0f} s\n")
    print(table)


if __name__ == "__main__":
    main()
