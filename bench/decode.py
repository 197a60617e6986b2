"""Decode benchmark: tokens/s and per-token latency of cached decoding on one GPU.

    python3 bench/decode.py                                   # everything below
    python3 bench/decode.py --variants=hybrid --batches=1 --contexts=1024 --ks=0,2   # a subset

Variants (same dims: hidden 2048, 8 layers, 64 experts top-4 width 512 + shared expert 512,
vocab 32K, 16 q / 2 kv heads of 256, GDN 16 key / 32 value heads of 128, one MTP depth, bf16
params and activations, RANDOM weights):
  hybrid      3 Gated DeltaNet : 1 gated attention (layers 4 and 8 attention)
  full_attn   every layer full attention (layer_types all 'full_attention')
  hybrid+mtpK hybrid with MTP self-speculative decoding, K drafts per verify forward
for batch 1 and 32 at context 1K, 8K and 32K.

What is timed: the jitted decode loop (qwen3next_jax.inference.speculative.run, one
lax.while_loop) generating --new_tokens tokens per row after a context of C tokens. The caches
are filled with random values at length C instead of running a C-token prefill (decode cost does
not depend on cache contents; a 32K x 32 prefill is a different benchmark). Latency = loop time /
tokens emitted per row; tokens/s = batch x tokens per row / loop time. Median of --repeats runs
after one compile+warm-up run.

Random weights give an MTP head that almost never agrees with the model, so measured acceptance is
~0 and speculative rows show the verify overhead. The "tok/s if all accepted" column is what the
same step time would give if every draft were accepted (k+1 tokens per step): the ceiling a
trained MTP head approaches. The markdown table is printed last and written to
$OUT/decode_bench.md (default ./out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from qwen3next_jax.config import FULL, ModelConfig  # noqa: E402
from qwen3next_jax.inference import decode, speculative  # noqa: E402
from qwen3next_jax.inference.cache import gdn_cache_nbytes, kv_cache_nbytes  # noqa: E402
from qwen3next_jax.model import Qwen3Next  # noqa: E402


def model_config(variant: str) -> ModelConfig:
    kw = dict(
        vocab_size=32768,
        hidden_size=2048,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=64,
        num_experts_per_tok=4,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        num_mtp_layers=1,
        max_position_embeddings=65536,
        param_dtype="bfloat16",
        dtype="bfloat16",
    )
    if variant == "full_attn":
        kw["layer_types"] = (FULL,) * 8
    return ModelConfig(**kw)


def synthetic_carry(model, batch, context, new_tokens, k, key):
    """The decode-loop carry after a context of ``context`` tokens, caches filled at random."""
    max_len = context + new_tokens + 2 * max(k, 3) + 2
    ids = jax.ShapeDtypeStruct((batch, context), jnp.int32)
    _, caches = jax.eval_shape(lambda i: decode._prefill(model, i, i, max_len), ids)
    if k:
        D = model.cfg.hidden_size
        h = jax.ShapeDtypeStruct((batch, context, D), model.dtype)
        nxt = jax.ShapeDtypeStruct((batch,), jnp.int32)
        _, caches = jax.eval_shape(
            lambda c, h, i, n: decode.mtp_prefill(model, c, h, i, i, n), caches, h, ids, nxt
        )
    leaves, treedef = jax.tree.flatten(caches)
    keys = jax.random.split(key, len(leaves))

    @jax.jit
    def fill(keys):
        out = []
        for kk, leaf in zip(keys, leaves, strict=True):
            if jnp.issubdtype(leaf.dtype, jnp.integer):
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
            else:
                out.append((0.1 * jax.random.normal(kk, leaf.shape)).astype(leaf.dtype))
        return jax.tree.unflatten(treedef, out)

    caches = fill(keys)
    caches = caches.replace(
        start=jnp.zeros((batch,), jnp.int32), length=jnp.full((batch,), context, jnp.int32)
    )
    D = model.cfg.hidden_size
    return dict(
        caches=caches,
        next=jax.random.randint(key, (batch,), 0, model.cfg.vocab_size, jnp.int32),
        mtp_h=jax.random.normal(key, (batch, D if k else 0)).astype(model.dtype),
        out=jnp.zeros((batch, new_tokens), jnp.int32),
        generated=jnp.ones((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        key=jax.random.key(0),
        steps=jnp.ones((batch,), jnp.int32),
        accepted=jnp.zeros((batch,), jnp.int32),
    )


def bench_one(model, batch, context, k, new_tokens, repeats):
    graphdef, state = nnx.split(model)
    opts = dict(max_new=new_tokens, temperature=0.0, top_p=1.0, k=k, eos_id=None)

    @jax.jit
    def run(state, carry):
        return speculative.run(nnx.merge(graphdef, state), carry, **opts)

    times, result = [], None
    for r in range(repeats + 1):
        carry = synthetic_carry(model, batch, context, new_tokens, k, jax.random.key(r))
        jax.block_until_ready(carry)
        t0 = time.perf_counter()
        result = jax.block_until_ready(run(state, carry))
        if r:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    emitted = new_tokens - 1  # the first token comes from the prefill
    steps = float(jnp.mean(result["steps"] - 1))
    accepted = float(jnp.mean(result["accepted"]))
    return dict(
        seconds=dt,
        latency_ms=1e3 * dt / emitted,
        tok_s=batch * emitted / dt,
        step_ms=1e3 * dt / max(steps, 1),
        accepted_per_step=accepted / max(steps, 1),
        ideal_tok_s=batch * (k + 1) / (dt / max(steps, 1)),
        gdn_mib=gdn_cache_nbytes(carry["caches"]) / 2**20,
        kv_mib=kv_cache_nbytes(carry["caches"]) / 2**20,
    )


def write_table(rows, new_tokens):
    """Print-ready markdown of ``rows``; also written to $OUT/decode_bench.md (default ./out)."""
    cfg = model_config("hybrid")
    lines = [
        f"Decode, random weights, bf16, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers,"
        f" {cfg.num_experts} experts top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}; "
        f"{new_tokens - 1} timed tokens per row after the context; device "
        f"{jax.devices()[0].device_kind}.",
        "",
        "| variant | batch | context | ms/token | tok/s | step ms | accepted/step "
        "| tok/s if all accepted | GDN cache MiB | KV cache MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['context']} | {r['latency_ms']:.2f} | "
            f"{r['tok_s']:.1f} | {r['step_ms']:.2f} | {r['accepted_per_step']:.2f} | "
            f"{r['ideal_tok_s']:.1f} | {r['gdn_mib']:.1f} | {r['kv_mib']:.1f} |"
        )
    table = "\n".join(lines)
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "decode_bench.md"), "w") as f:
        f.write(table + "\n")

    return table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default="hybrid,full_attn,hybrid+mtp")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--contexts", default="1024,8192,32768")
    p.add_argument("--ks", default="1,2,3", help="draft counts for the hybrid+mtp variant")
    p.add_argument("--new_tokens", type=int, default=65)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in ("hybrid", "full_attn", "hybrid+mtp"):
            p.error(f"unknown variant {v!r}; expected hybrid, full_attn or hybrid+mtp.")
    print(f"devices: {jax.devices()}  (random weights, bf16)", flush=True)
    rows = []
    models = {}
    for v in variants:
        base = "full_attn" if v == "full_attn" else "hybrid"
        if base not in models:
            models[base] = Qwen3Next(model_config(base), rngs=nnx.Rngs(0))
        model = models[base]
        ks = ints(args.ks) if v == "hybrid+mtp" else [0]
        for B in ints(args.batches):
            for C in ints(args.contexts):
                for k in ks:
                    name = f"hybrid+mtp{k}" if v == "hybrid+mtp" else v
                    try:
                        r = bench_one(model, B, C, k, args.new_tokens, args.repeats)
                    except Exception as e:  # noqa: BLE001 - report OOM etc. and go on
                        print(f"{name} B={B} C={C}: failed: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    r.update(variant=name, batch=B, context=C)
                    rows.append(r)
                    write_table(rows, args.new_tokens)  # a run cut short keeps its rows
                    print(
                        f"{name:12s} B={B:3d} C={C:6d}  {r['latency_ms']:8.2f} ms/token  "
                        f"{r['tok_s']:10.1f} tok/s  accepted/step {r['accepted_per_step']:.2f}",
                        flush=True,
                    )
    print(write_table(rows, args.new_tokens))


if __name__ == "__main__":
    main()
