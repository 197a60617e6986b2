"""Dense projections forward+backward: how the result dtype of a 16-bit product decides the
speed of its backward (bench/RESULTS.md, session 4).

For each shape [T, D] @ [D, F] in bf16, times the forward+backward (grads of x and w) of:
  f32 result, plain autodiff   jnp.einsum(..., preferred_element_type=f32) then cast to bf16:
                               the cotangent reaching the product is float32 (the old
                               layers.params.project, and the old router / LM-head logits)
  bf16 result                  preferred_element_type=bf16 (layers.params.project now)
  einsum_f32                   float32 result, 16-bit backward (ops/linear.py)
with the 8192^3 bf16 matmul rate of the same run as the reference; TFLOP/s count 3 products.

    python3 bench/dense.py [--shapes TxDxF ...] [--steps N]
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from qwen3next_jax.ops.linear import einsum_f32  # noqa: E402


def timeit(fn, *args, steps):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=["32768x2048x512", "32768x2048x4096", "8192x2048x151936"],
        help="TxDxF: tokens, input width, output width",
    )
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    bf, f32 = jnp.bfloat16, jnp.float32
    print(f"jax {jax.__version__} {jax.devices()[0].device_kind}")
    a = jnp.ones((8192, 8192), bf)
    mm = timeit(jax.jit(lambda a: a @ a), a, steps=args.steps)
    rate = 2 * 8192**3 / mm / 1e9
    print(f"bf16 matmul 8192^3: {mm:.3f} ms = {rate:.0f} TFLOP/s")

    variants = {
        "f32 result, plain autodiff": lambda x, w: jnp.einsum(
            "td,df->tf", x, w, preferred_element_type=f32
        ).astype(bf),
        "bf16 result": lambda x, w: jnp.einsum("td,df->tf", x, w, preferred_element_type=bf),
        "einsum_f32": lambda x, w: einsum_f32("td,df->tf", x, w),
    }
    rows = ["| T x D x F | variant | fwd+bwd ms | TFLOP/s | % of matmul |", "|---|---|---|---|---|"]
    for shape in args.shapes:
        T, D, F = (int(v) for v in shape.split("x"))
        kx, kw = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (T, D), bf)
        w = (jax.random.normal(kw, (D, F), f32) * D**-0.5).astype(bf)
        flops = 3 * 2 * T * D * F
        for name, fn in variants.items():
            loss = lambda x, w, fn=fn: jnp.sum(fn(x, w).astype(f32) ** 2)
            ms = timeit(jax.jit(jax.grad(loss, (0, 1))), x, w, steps=args.steps)
            tf = flops / ms / 1e9
            rows.append(f"| {shape} | {name} | {ms:.3f} | {tf:.0f} | {100 * tf / rate:.0f}% |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
