"""Registers, spills, shared memory and tensor-core instructions of a workload's Pallas kernels,
compiled for an H100/H200 (sm_90a) on a CPU host: no GPU and no device time needed.

    python bench/triton_offline.py delta_rule --shape 1x32768 [--tuning '{"warps_wy": 8}']
    python bench/triton_offline.py moe --tokens 4096 [--set moe_pallas.NUM_WARPS=4]

JAX lowers the workload's forward+backward for CUDA (as it does before handing the kernels to
XLA); every pallas_call's Triton module (TTIR text) and launch parameters are captured, compiled
by the `triton` package of --triton-python (install one beside the project: `python -m venv
/tmp/tvenv && /tmp/tvenv/bin/pip install triton==3.6.0`, the version on the GPU machines) and
assembled by `ptxas -v`. XLA compiles the same TTIR with its own Triton, so the figures are a
close estimate, not a reading: on 2026-11-29 the shared memory of every delta-rule kernel matched
Nsight Compute's reading on an H200 to the byte, and the kernels that spilled here were the slow
ones there. Spilled bytes are the first thing to look at before spending device time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from kernel_profile import apply_overrides  # noqa: E402

# Runs under --triton-python: compiles each TTIR file for sm_90a, prints one JSON line a kernel.
# triton.compile skips the TTIR passes of an IR file's own stage (canonicalize, combine, ...),
# which XLA runs on Pallas's module; they are run here first. Without them every `acc + dot`
# stayed a zero-accumulator dot plus an add: no wgmma overlap across steps and twice the
# accumulator registers (MoE down kernel: 152 registers instead of 92).
COMPILE = r"""
import json, sys
import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
for path, warps, stages in json.loads(sys.argv[1]):
    try:
        ctx = ir.context()
        ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        mod = ir.parse_mlir_module(path, ctx)
        mod.context = ctx
        opts = backend.parse_options(dict(num_warps=warps, num_stages=stages))
        CUDABackend.make_ttir(mod, {}, opts, target.arch)
        opt_path = path[:-5] + ".opt.ttir"
        with open(opt_path, "w") as f:
            f.write(str(mod))
        ck = triton.compile(opt_path, target=target,
                            options=dict(num_warps=warps, num_stages=stages))
        with open(path[:-5] + ".ptx", "w") as f:
            f.write(ck.asm["ptx"])
        print(json.dumps(dict(path=path, smem=ck.metadata.shared, ptx=path[:-5] + ".ptx")))
    except Exception as e:  # report and go on: one kernel's failure says something too
        print(json.dumps(dict(path=path, error=f"{type(e).__name__}: {str(e)[:200]}")))
"""


def capture(lower_fn):
    """Lowers with the Pallas Triton lowering hooked: [(name, ttir text, warps, stages)].

    The launch parameters come from the custom calls' backend_config in the lowered module,
    matched by kernel name (kernels of one name in the order the module lists them)."""
    from jax._src.pallas.triton import lowering

    kernels, orig = [], lowering.lower_jaxpr_to_triton_module

    def lower(jaxpr, *a, **kw):
        res = orig(jaxpr, *a, **kw)
        name = jaxpr.debug_info.func_name if jaxpr.debug_info else "kernel"
        kernels.append((name, res.module.operation.get_asm(enable_debug_info=False)))
        return res

    lowering.lower_jaxpr_to_triton_module = lower
    try:
        text = lower_fn().as_text()
    finally:
        lowering.lower_jaxpr_to_triton_module = orig
    launch = {}  # name -> [(warps, stages)] in the module's order
    pattern = r'ir = "(?:[^"\\]|\\.)*", name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+)'
    for m in re.finditer(pattern, text):
        launch.setdefault(m[1].strip("_"), []).append((int(m[3]), int(m[2])))
    out = []
    for name, ttir in kernels:
        todo = launch.get(name.strip("_"))
        if not todo:
            raise RuntimeError(f"no launch parameters found for kernel {name!r} in {list(launch)}")
        out.append((name, ttir, *(todo.pop(0) if len(todo) > 1 else todo[0])))
    return out


def delta_rule_lowering(args):
    import jax
    import jax.numpy as jnp

    from qwen3next_jax.ops import delta_rule_pallas as drp

    b, t = (int(s) for s in args.shape.split("x"))
    h, hv, k = 16, 32, 128
    tuning = json.loads(args.tuning) if args.tuning else None
    sd, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    qk, v, gb = sd((b, t, h, k), bf), sd((b, t, hv, k), bf), sd((b, t, hv), jnp.float32)
    shapes = [qk, qk, v, gb, gb]

    def fwd_bwd(*a):
        o, vjp = jax.vjp(lambda *x: drp.pallas_gated_delta_rule(*x, tuning=tuning)[0], *a)
        return o, vjp(jnp.ones_like(o))

    return lambda: jax.jit(fwd_bwd).trace(*shapes).lower(lowering_platforms=("cuda",))


def moe_lowering(args):
    import jax
    import jax.numpy as jnp

    from qwen3next_jax.ops import moe, moe_pallas

    moe_pallas._interpret = lambda: False  # the kernels as the GPU gets them, not interpreted
    t, d, e, f, k = args.tokens, 2048, 512, 512, 10
    sd, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    shapes = (
        sd((t, d), bf),
        sd((d, e), bf),
        sd((e, d, f), bf),
        sd((e, d, f), bf),
        sd((e, f, d), bf),
    )

    def loss(x, wr, wg, wu, wd):
        w, idx, _ = moe.router_topk(moe.router_logits(x, wr), k, impl="pallas")
        y, _ = moe.routed_experts(x, w, idx, wg, wu, wd, backend=args.backend)
        return jnp.sum(y.astype(jnp.float32))

    grad = jax.grad(loss, argnums=range(5))
    return lambda: jax.jit(grad).trace(*shapes).lower(lowering_platforms=("cuda",))


WORKLOADS = {"delta_rule": delta_rule_lowering, "moe": moe_lowering}


def ptxas_report(ptxas, ptx_path):
    """(registers, spill-store bytes, spill-load bytes, wgmma instructions) of one kernel."""
    out = subprocess.run(
        [ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", os.devnull], capture_output=True, text=True
    )
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas gave no register report for {ptx_path}: {out.stderr[:300]}")
    with open(ptx_path) as f:
        ptx = f.read()
    # wgmma.wait_group N > 0 keeps N groups in flight: the next step's MMAs overlap this one's
    overlap = any(int(n) > 0 for n in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))
    return int(regs[1]), int(spills[1]), int(spills[2]), ptx.count("wgmma.mma_async"), overlap


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--shape", default="1x32768", help="delta_rule: BxT (Qwen3-Next heads)")
    ap.add_argument("--tuning", default="", help="delta_rule: JSON dict of _Cfg options")
    ap.add_argument("--tokens", type=int, default=4096, help="moe: tokens")
    ap.add_argument("--backend", default="pallas_fused", help="moe: routed-experts backend")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE")
    ap.add_argument("--triton-python", default=sys.executable, help="a Python with triton")
    ap.add_argument("--ptxas", default="", help="ptxas (default: PATH, then triton's own)")
    ap.add_argument("--keep", default="", help="directory to keep the .ttir / .ptx files in")
    args = ap.parse_args()
    apply_overrides(args.set)
    probe = subprocess.run(
        [args.triton_python, "-c", "import triton, os; print(os.path.dirname(triton.__file__))"],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        sys.exit(
            f"--triton-python {args.triton_python} cannot import triton; install one, e.g. "
            "`python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton==3.6.0`, and pass "
            "--triton-python /tmp/tvenv/bin/python"
        )
    bundled = os.path.join(probe.stdout.strip(), "backends", "nvidia", "bin", "ptxas")
    ptxas = args.ptxas or shutil.which("ptxas") or bundled
    if not os.path.exists(ptxas):
        sys.exit(f"no ptxas at {ptxas!r}: pass --ptxas")

    kernels = capture(WORKLOADS[args.workload](args))
    work = args.keep or tempfile.mkdtemp(prefix="triton_offline_")
    os.makedirs(work, exist_ok=True)
    jobs, names = [], {}
    for i, (name, text, warps, stages) in enumerate(kernels):
        path = os.path.join(work, f"{i:02d}_{name}.ttir")
        with open(path, "w") as f:
            f.write(text)
        jobs.append((path, warps, stages))
        names[path] = (name, warps, stages)
    out = subprocess.run(
        [args.triton_python, "-c", COMPILE, json.dumps(jobs)], capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(f"the Triton compile failed:\n{out.stderr[-2000:]}")
    print(f"{args.workload} {' '.join(sys.argv[2:])}: {len(kernels)} kernels, sm_90a")
    print(
        "| kernel | warps | stages | registers | spill stores / loads (B) | shared mem (B) "
        "| wgmma | wgmma overlap |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for line in out.stdout.splitlines():
        r = json.loads(line)
        name, warps, stages = names[r["path"]]
        if "error" in r:
            print(f"| {name} | {warps} | {stages} | failed: {r['error']} | | | | |")
            continue
        regs, st, ld, wgmma, overlap = ptxas_report(ptxas, r["ptx"])
        print(
            f"| {name} | {warps} | {stages} | {regs} | {st} / {ld} | {r['smem']} | {wgmma} "
            f"| {'yes' if overlap else 'no' if wgmma else '-'} |"
        )


if __name__ == "__main__":
    main()
