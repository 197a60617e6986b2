"""Train-step benchmark on one GPU: train.py's jitted train step on a Qwen3-Next-shaped model,
against Hugging Face transformers' Qwen3NextForCausalLM (PyTorch) on the same model, in one run.

    python3 bench/train_step.py            # 4 layers, 128 experts, 8 x 4096 tokens, MTP 0 and 1
    python3 bench/train_step.py --experts 256 --mtp 0 --batch 4
    python3 bench/train_step.py --dry      # tiny model on any platform, no HF

Model: configs/qwen3_next_80b_a3b.py, i.e. the 80B-A3B's layer shapes (hidden 2048; gated
attention, 16 query / 2 KV heads of 256; Gated DeltaNet, 16 key / 32 value heads of 128; top-10
routed experts of width 512 plus the gated shared expert; vocab 151,936; bf16 compute, fp32
master weights and Adam moments, remat per layer) cut to --layers layers (3 DeltaNet : 1
attention) and --experts experts, so that weights, gradients and optimizer state (16 bytes a
parameter) fit one GPU: 4 layers of 512 experts would need 115 GB before activations. Per-token
compute does not depend on the expert count.

Rows (medians over --steps batches of --inner steps issued back to back, one host sync a batch):
  step     trainer.train_step: loss, gradients, clipping, AdamW, load-balancing and MTP terms,
           the state donated as in train.py's loop;
  fwd+bwd  trainer.grads_step: loss and gradients only (no optimizer update);
  HF       one optimizer step of Qwen3NextForCausalLM built from ModelConfig.to_hf_config(): bf16
           weights, torch.optim.AdamW(fused=True), loss from labels (CUDA events per step). HF
           has no MTP, so it matches the --mtp 0 rows. Its Gated DeltaNet is the PyTorch
           fallback when flash-linear-attention is not installed (the device image): HF's speed
           as installed, printed in the table.
TFLOP/s use metrics.flops_per_token's training count (3 x forward: every active weight, the
attention and DeltaNet cores, the MTP depths) times tokens; "% mm" divides by an 8192^3 bf16
matmul measured in the same run, MFU by the datasheet peak. The table is printed last and written
to $OUT/train_step_bench.md (default ./out).
"""

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch runs first, same host
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_child  # noqa: E402 - bench/ (this script's folder) is on sys.path
import moe as mb  # noqa: E402 - bench/moe.py: its timing and matmul-rate helpers


def make_config(args, mtp: int):
    """The experiment config: 80B-A3B shapes cut to args' layers / experts, one device's mesh."""
    if args.dry:
        from configs import default

        c = default.get_config()
    else:
        from configs import qwen3_next_80b_a3b

        c = qwen3_next_80b_a3b.get_config()
        c.model.num_hidden_layers = args.layers
        c.model.num_experts = args.experts
    c.model.num_mtp_layers = mtp
    c.global_batch_size = args.batch
    c.data.seq_len = args.seq
    c.micro_batches = 1
    c.mesh = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    return c


# --------------------------------------------------------------------------- HF torch reference
def hf_main(args):
    """Runs in a child process (torch and JAX keep separate allocators); prints one JSON line."""
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from qwen3next_jax.training.train_step import model_config_from

    mcfg = model_config_from(make_config(args, 0))
    hf_cfg = Qwen3NextConfig.from_dict(mcfg.to_hf_config())
    hf_cfg._experts_implementation = "grouped_mm"  # transformers' grouped experts, not its loop
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):  # initialised in place: a CPU init of ~2.5B weights takes minutes
        model = Qwen3NextForCausalLM(hf_cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, mcfg.vocab_size, (args.batch, args.seq), device="cuda")
    out = {"fla": _has_fla()}

    def fwd_bwd():
        model(input_ids=ids, labels=ids).loss.backward()

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn):
        return hf_child.cuda_median_ms(fn, args.steps, warmup=2)

    try:
        out["step"] = timed(step)
        out["fwd+bwd"] = timed(lambda: (fwd_bwd(), opt.zero_grad(set_to_none=True)))
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    except Exception as e:  # noqa: BLE001 - report it: the JAX side still runs
        out["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    hf_child.emit(out)


def _has_fla() -> bool:
    try:
        import fla  # noqa: F401

        return True
    except ImportError:
        return False


def run_hf(args):
    argv = ["--hf-child", "--layers", str(args.layers), "--experts", str(args.experts)]
    argv += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    return hf_child.run(os.path.abspath(__file__), argv)


# --------------------------------------------------------------------------- JAX side
def synthetic_batch(trainer, batch: int, seq: int, vocab: int):
    """Uniform random tokens, one document a row (the shapes and dtypes of pipeline's batches)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    tok = rng.integers(0, vocab, (batch, seq + 1))
    host = {
        "inputs": tok[:, :-1],
        "targets": tok[:, 1:],
        "segment_ids": np.ones((batch, seq)),
        "positions": np.broadcast_to(np.arange(seq), (batch, seq)),
        "loss_mask": np.ones((batch, seq)),
    }
    return {
        k: jax.device_put(np.asarray(v, np.int32), trainer.batch_sharding) for k, v in host.items()
    }


def peak_gb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def bench_jax(args, mtp: int) -> dict:
    import jax

    from qwen3next_jax import sharding
    from qwen3next_jax.training import metrics, train_step

    config = make_config(args, mtp)
    mesh = sharding.mesh_from_config(config, jax.devices()[:1])
    trainer = train_step.build(config, mesh)
    mcfg = trainer.model_cfg
    state = trainer.init()
    batch = synthetic_batch(trainer, args.batch, args.seq, mcfg.vocab_size)
    row = {
        "mtp": mtp,
        "params_b": metrics.count_params(mcfg)["total_with_mtp"] / 1e9,
        "train_flops_per_token": metrics.flops_per_token(mcfg, args.seq)["train"],
    }

    # moe.time_ms times after its own first call (here a warm one) and one more warm-up
    timed = functools.partial(mb.time_ms, steps=args.steps, warmup=1, inner=args.inner)
    if not args.no_fwd_bwd:
        params = state["params"]  # donated by the first train_step below: grads_step runs first
        t0 = time.perf_counter()
        jax.block_until_ready(trainer.grads_step(params, batch))
        row["fwd+bwd_compile_s"] = time.perf_counter() - t0
        row["fwd+bwd"] = timed(trainer.grads_step, (params, batch))

    t0 = time.perf_counter()
    state, m = trainer.train_step(state, batch)
    jax.block_until_ready(state["step"])
    row["step_compile_s"] = time.perf_counter() - t0
    row["loss_first"] = float(m["loss"])

    def one_step():  # the state is donated: each call trains on from the last one's
        nonlocal state
        state, _ = trainer.train_step(state, batch)
        return state["step"]

    row["step"] = timed(one_step, ())
    _, m = trainer.train_step(state, batch)
    row["loss_last"] = float(m["loss"])
    row["peak_gb"] = peak_gb()
    return row


# --------------------------------------------------------------------------- report
def table(args, rows, hf, mm_rate, peak_tflops):
    tokens = args.batch * args.seq
    lines = [
        f"tokens per step {tokens} ({args.batch} x {args.seq}); bf16 matmul {mb.MATMUL_N}^3 "
        f"measured in this run: {mm_rate:.0f} TFLOP/s; datasheet peak "
        f"{peak_tflops or float('nan'):.0f} TFLOP/s",
        "",
        "| implementation | MTP | params | fwd+bwd ms | step ms | tokens/s | model TFLOP/s "
        "| % mm | MFU | step vs HF | peak GB | compile s (fwd+bwd / step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    flops0 = next(
        (r["train_flops_per_token"] for r in rows if r["mtp"] == 0 and "error" not in r), None
    )

    def figures(ms, flops_per_token):
        tf = tokens * flops_per_token / (ms * 1e-3) / 1e12
        mfu = f"{100 * tf / peak_tflops:.0f}%" if peak_tflops else "-"
        return [f"{tokens / (ms * 1e-3):,.0f}", f"{tf:.0f}", f"{100 * tf / mm_rate:.0f}%", mfu]

    hf_step = hf.get("step")
    if hf:
        name = "HF Qwen3NextForCausalLM (torch" + (", fla)" if hf.get("fla") else ", no fla)")
        if "error" in hf or flops0 is None:
            lines.append(f"| {name} | 0 | | failed: {hf.get('error', 'no MTP-0 row')} ||||||||")
        else:
            lines.append(
                "| "
                + " | ".join(
                    [name, "0", "", f"{hf['fwd+bwd']:.1f}", f"{hf_step:.1f}"]
                    + figures(hf_step, flops0)
                    + ["", f"{hf['peak_gb']:.1f}", "-"]
                )
                + " |"
            )
    for r in rows:
        if "error" in r:
            lines.append(f"| qwen3next_jax | {r['mtp']} | | failed: {r['error']} ||||||||")
            continue
        vs = f"{hf_step / r['step']:.2f}x" if hf_step and r["mtp"] == 0 else ""
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        cells = ["qwen3next_jax train_step", str(r["mtp"]), f"{r['params_b']:.2f}B"]
        fb = f"{r['fwd+bwd']:.1f}" if "fwd+bwd" in r else "-"
        fb_compile = f"{r['fwd+bwd_compile_s']:.0f}" if "fwd+bwd" in r else "-"
        cells += [fb, f"{r['step']:.1f}"]
        cells += figures(r["step"], r["train_flops_per_token"])
        cells += [vs, peak, f"{fb_compile} / {r['step_compile_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--layers", type=int, default=4, help="decoder layers (3 DeltaNet : 1 attention)"
    )
    ap.add_argument("--experts", type=int, default=128, help="routed experts (top-10 of them)")
    ap.add_argument("--mtp", type=int, nargs="+", default=[0, 1], help="MTP depths, one row each")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5, help="timed batches (medians)")
    ap.add_argument("--inner", type=int, default=3, help="steps per timed batch")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-fwd-bwd", action="store_true", help="time the train step only")
    ap.add_argument("--dry", action="store_true", help="configs/default.py's tiny model, no HF")
    ap.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry:
        mb.MATMUL_N = 256
        args.batch, args.seq, args.steps, args.inner, args.no_hf = 2, 64, 1, 1, True
    if args.hf_child:
        return hf_main(args)

    hf = {} if args.no_hf else run_hf(args)
    if hf:
        print("HF: " + json.dumps(hf), flush=True)
    import jax

    from qwen3next_jax.training import metrics

    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}", flush=True)
    mm_rate = mb.matmul_tflops(args.steps)
    print(f"matmul {mb.MATMUL_N}^3 bf16: {mm_rate:.0f} TFLOP/s", flush=True)
    rows = []
    for mtp in args.mtp:
        try:
            rows.append(bench_jax(args, mtp))
        except Exception as e:  # noqa: BLE001 - report, keep the other rows
            rows.append(
                {"mtp": mtp, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            )
        print(json.dumps(rows[-1]), flush=True)
        jax.clear_caches()
    peak = metrics.peak_flops_per_device(jax.devices()[0])
    md = table(args, rows, hf, mm_rate, None if peak is None else peak / 1e12)
    print("\n" + md)
    out = os.environ.get("OUT", "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_step_bench.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "train_step_bench.json"), "w") as f:
        json.dump({"rows": rows, "hf": hf, "matmul_tflops": mm_rate}, f, indent=1)


if __name__ == "__main__":
    main()
