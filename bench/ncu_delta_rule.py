"""One forward+backward of the Gated DeltaNet core inside a CUDA profiler range, for Nsight Compute.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \
        python3 bench/ncu_delta_rule.py --impl pallas --shape 1x32768
    ncu ... python3 bench/ncu_delta_rule.py --impl fla --shape 1x32768

Warm-up calls (compilation, Triton autotuning) run outside the range, so ncu sees each kernel of
one step exactly once. The range is opened with cudaProfilerStart from PyTorch's CUDA runtime
binding (torch is on the GPU machine; the JAX path imports it only for that call).
"""

from __future__ import annotations

import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default="pallas", help="fla, or a bench/delta_rule.py JAX impl")
    ap.add_argument("--shape", default="1x32768")
    ap.add_argument("--tuning", default="")
    args = ap.parse_args()
    import delta_rule as db  # bench/delta_rule.py (this script's folder is on sys.path)

    b, t = (int(s) for s in args.shape.split("x"))
    import torch

    if args.impl == "fla":
        _, fla_fn = db.fla_setup()
        q, k, v, g, beta, do = db.make_inputs(b, t)
        bf = lambda x: torch.from_numpy(x).cuda().to(torch.bfloat16)  # noqa: E731
        leaves = [
            x.requires_grad_(True)
            for x in (bf(q), bf(k), bf(v), torch.from_numpy(g).cuda(), bf(beta))
        ]
        tdo = bf(do)

        def step():
            for x in leaves:
                x.grad = None
            fla_fn(*leaves)[0].backward(tdo)
            torch.cuda.synchronize()
    else:
        import jax

        q, k, v, g, beta, do = db.to_jax(db.make_inputs(b, t))
        tuning = json.loads(args.tuning) if args.tuning else None
        _, fb = db.jax_fns(db.jax_impl(args.impl, tuning))

        def step():
            jax.block_until_ready(fb(q, k, v, g, beta, do))

    for _ in range(3):
        step()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled one step", file=sys.stderr)


if __name__ == "__main__":
    main()
