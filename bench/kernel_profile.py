"""Per-kernel GPU time of one benchmark workload, read from a JAX profiler trace.

    python3 bench/kernel_profile.py moe --tokens 32768 --backend pallas_fused --router pallas
    python3 bench/kernel_profile.py delta_rule --shape 1x32768 [--tuning '{"bv_seq": 64}']
    python3 bench/kernel_profile.py train_step [--layers 4 --experts 128 --mtp 0 --batch 8]
    python3 bench/kernel_profile.py moe --set moe_pallas.TGMM_ROWS=128   # a module constant
    python3 bench/kernel_profile.py moe --set 'moe_mosaic.DX={"stages": 5}'  # a config's fields

Runs the workload's jitted step (forward+backward unless --fwd) a few times, traces --steps more
with jax.profiler, and prints each GPU kernel's time per step (summed over its launches), its
launch count and share of the summed kernel time, largest first, with the step's wall time and
the HLO op that launched it. The events come from CUPTI, so the figures are the kernels of the
real step, fused as XLA fuses them (unlike timing each part jitted alone). The traced steps are
issued back to back with one host sync (as bench/moe.py times them), so the GPU's idle time
between kernels inside that window is the step's launch and dependency overhead: printed per step
with the largest gaps; --timeline prints one step's kernels in order with the gap before each.
Caution: the traced batch follows an idle sleep, and an H200 under these kernels is held by its
power cap (~1.6 GHz, ~600 W): a short batch after idle starts at higher clocks. At 32K tokens on
2026-12-03 a traced batch of 5 read 16.4-16.8 ms a step against 17.8 ms untraced; batches of 100
read the same traced and untraced (18.28 / 18.24 ms). The untraced walls are the step's speed.
--dump DIR passes --xla_dump_to=DIR (HLO text of the step; on JAX 0.11.2 it held no PTX of the
Pallas kernels: for registers and occupancy use Nsight Compute, see bench/ncu_delta_rule.py, or
bench/triton_offline.py without a GPU).
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import glob
import importlib
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def moe_step(args):
    """The MoE layer of bench/moe.py (router + routed experts + shared expert)."""
    import jax
    import moe as mb  # bench/moe.py (this script's folder is on sys.path)

    if args.dry:
        mb.set_dry_shapes()
    mb.ROUTER_IMPL = args.router
    params = mb.init_params(jax.random.key(0), jax.numpy.bfloat16)
    x, cot = mb.inputs(args.tokens)
    fwd, grad = mb.make_fns(args.backend)
    fn = fwd if args.fwd else grad
    return fn, (params, x, cot)


def delta_rule_step(args):
    """The Gated DeltaNet core of bench/delta_rule.py (Pallas kernels, Qwen3-Next shapes)."""
    import delta_rule as db  # bench/delta_rule.py

    b, t = (int(s) for s in args.shape.split("x"))
    tuning = json.loads(args.tuning) if args.tuning else None
    q, k, v, g, beta, do = db.to_jax(db.make_inputs(b, t))
    f, fb = db.jax_fns(db.jax_impl(args.impl, tuning))
    return (f, (q, k, v, g, beta)) if args.fwd else (fb, (q, k, v, g, beta, do))


def train_step_step(args):
    """The model's loss and gradients (trainer.grads_step, no optimizer update: the train step
    donates its state) on bench/train_step.py's cut-down 80B-A3B model and synthetic batch."""
    import jax
    import train_step as tb  # bench/train_step.py

    from qwen3next_jax import sharding
    from qwen3next_jax.training import train_step

    if args.dry:
        args.batch, args.seq = 2, 64
    config = tb.make_config(args, args.mtp)
    trainer = train_step.build(config, sharding.mesh_from_config(config, jax.devices()[:1]))
    params = trainer.init()["params"]
    batch = tb.synthetic_batch(trainer, args.batch, args.seq, trainer.model_cfg.vocab_size)
    return trainer.grads_step, (params, batch)


WORKLOADS = {"moe": moe_step, "delta_rule": delta_rule_step, "train_step": train_step_step}


def apply_overrides(items):
    """--set MODULE.NAME=VALUE: sets constant NAME of qwen3next_jax.ops.MODULE to a literal; a
    dict for a dataclass constant replaces those fields (`moe_mosaic.DX={"stages": 4}`)."""
    for item in items:
        target, value = item.split("=", 1)
        mod_name, attr = target.rsplit(".", 1)
        mod = importlib.import_module(f"qwen3next_jax.ops.{mod_name}")
        if not hasattr(mod, attr):
            sys.exit(f"--set {item}: {mod.__name__} has no {attr}")
        value, current = ast.literal_eval(value), getattr(mod, attr)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = dataclasses.replace(current, **value)
        setattr(mod, attr, value)


def _stat(event, name):
    for key, value in event.stats:
        if key == name:
            return value
    return None


def gpu_events(xplane_path):
    """[(start ns, duration ns, kernel name, hlo op)] of the GPU planes' stream lines, by start."""
    from jax.profiler import ProfileData

    events = []
    for plane in ProfileData.from_file(xplane_path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                op = str(_stat(ev, "hlo_op") or "")
                events.append((ev.start_ns, ev.duration_ns, ev.name, op))
    return sorted(events)


def kernel_table(events, steps):
    """{kernel name: (ns per step, launches per step, hlo op)}."""
    table = collections.defaultdict(lambda: [0, 0, ""])
    for _, ns, name, op in events:
        row = table[name]
        row[0] += ns
        row[1] += 1
        row[2] = row[2] or op
    return {k: (ns / steps, n / steps, op) for k, (ns, n, op) in table.items()}


def batch_seconds(fn, args, n):
    """Wall seconds of `n` calls issued back to back with one host sync at the end (one stream:
    the last call ends after the others); earlier outputs are freed as a training loop frees
    them."""
    import jax

    t0 = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - t0


SENTINEL_GAP_S = 0.2  # host sleep between the traced sentinel call and the traced batch


def traced_batch(fn, args, n):
    """(GPU events of `n` back-to-back calls, their wall seconds), from a profiler trace.

    The trace also holds one synced call and a SENTINEL_GAP_S sleep ahead of the batch: CUPTI
    can hand over kernels of earlier calls (seen on an H200: a kernel 350 ms ahead of the rest,
    and a first call whose kernels lagged the others), so only the events after the last GPU
    idle gap of over half the sleep are the batch's."""
    import jax

    trace_dir = tempfile.mkdtemp(prefix="jax_trace_")
    jax.profiler.start_trace(trace_dir)
    jax.block_until_ready(fn(*args))
    time.sleep(SENTINEL_GAP_S)
    wall = batch_seconds(fn, args, n)
    jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        return [], wall
    events = gpu_events(paths[0])
    start, end = 0, 0
    for i, (t, ns, _, _) in enumerate(events):
        if i and t - end > SENTINEL_GAP_S * 5e8:
            start = i
        end = max(end, t + ns)
    return events[start:], wall


def steps_in(events):
    """The number of steps the events hold: most kernels launch once a step. (On an H200 the
    trace of 5 calls at times held 4: a first call stalled past the sentinel gap, so its kernels
    were cut with the sentinel's.)"""
    launches = collections.Counter(name for _, _, name, _ in events)
    return collections.Counter(launches.values()).most_common(1)[0][0]


def idle_gaps(events):
    """(window ns, busy ns, [(gap ns, kernel before, kernel after)] largest first): the GPU's
    idle time between the first kernel's start and the last kernel's end (streams merged)."""
    gaps, busy = [], 0
    end, prev = events[0][0], ""
    for start, ns, name, _ in events:
        if start > end:
            gaps.append((start - end, prev, name))
        busy += max(0, start + ns - max(start, end))
        if start + ns >= end:
            end, prev = start + ns, name
    return end - events[0][0], busy, sorted(gaps, reverse=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--fwd", action="store_true", help="forward only (default forward+backward)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument(
        "--batches",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[5],
        help="untraced wall time per step in batches of these many back-to-back calls, e.g. 1,5,20",
    )
    ap.add_argument(
        "--timeline", action="store_true", help="print the last traced step's kernels in order"
    )
    ap.add_argument("--dump", default="", help="directory for XLA's dump (HLO text)")
    ap.add_argument(
        "--dry", action="store_true", help="moe, train_step: tiny shapes (any platform)"
    )
    ap.add_argument("--tokens", type=int, default=32768, help="moe: tokens")
    ap.add_argument("--backend", default="pallas_fused", help="moe: routed-experts backend")
    ap.add_argument("--router", default="pallas", help="moe: router_topk impl")
    ap.add_argument("--shape", default="1x32768", help="delta_rule: BxT")
    ap.add_argument("--layers", type=int, default=4, help="train_step: decoder layers")
    ap.add_argument("--experts", type=int, default=128, help="train_step: routed experts")
    ap.add_argument("--mtp", type=int, default=0, help="train_step: MTP depths")
    ap.add_argument("--batch", type=int, default=8, help="train_step: sequences")
    ap.add_argument("--seq", type=int, default=4096, help="train_step: sequence length")
    ap.add_argument("--impl", default="pallas", help="delta_rule: bench impl name")
    ap.add_argument("--tuning", default="", help="delta_rule: JSON dict of _Cfg options")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODULE.NAME=VALUE",
        help="override a module constant first, e.g. moe_pallas.TGMM_ROWS=128 (a Python literal)",
    )
    args = ap.parse_args()
    apply_overrides(args.set)
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text"
        )

    import jax

    fn, fn_args = WORKLOADS[args.workload](args)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*fn_args))
    print(f"compile + first run {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(3):
        jax.block_until_ready(fn(*fn_args))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        jax.block_until_ready(fn(*fn_args))
    wall_ms = (time.perf_counter() - t0) / args.steps * 1e3
    batched = {
        n: sorted(batch_seconds(fn, fn_args, n) / n * 1e3 for _ in range(3))[1]
        for n in args.batches
    }

    events, _ = traced_batch(fn, fn_args, args.steps)
    if not events:
        sys.exit("the profiler trace holds no GPU kernel events (is this a GPU?)")
    n = steps_in(events)
    rows = sorted(kernel_table(events, n).items(), key=lambda kv: -kv[1][0])
    total = sum(ns for ns, _, _ in (v for _, v in rows))
    label = " ".join(sys.argv[1:])
    per_batch = ", ".join(f"{ms:.3f} in batches of {n}" for n, ms in batched.items())
    print(
        f"\n{label}: wall {wall_ms:.3f} ms/step (untraced, a host sync per step; {per_batch}), "
        f"kernels {total / 1e6:.3f} ms/step"
    )
    print("| kernel | us/step | launches/step | % | hlo op |\n|---|---|---|---|---|")
    for name, (ns, n, op) in rows[: args.top]:
        print(f"| {name[:70]} | {ns / 1e3:.1f} | {n:g} | {100 * ns / total:.1f} | {op[:40]} |")
    rest = sum(ns for _, (ns, _, _) in rows[args.top :])
    if rest:
        print(
            f"| ({len(rows) - args.top} more) | {rest / 1e3:.1f} | | {100 * rest / total:.1f} | |"
        )
    window, busy, gaps = idle_gaps(events)
    print(
        f"\n{n} steps back to back (traced): GPU span {window / n / 1e6:.3f} ms/step, busy "
        f"{busy / n / 1e6:.3f}, idle {(window - busy) / n / 1e6:.3f} ({len(gaps) / n:g} gaps/step)"
    )
    print("| gap us | kernel before | kernel after |\n|---|---|---|")
    for ns, before, after in gaps[:15]:
        print(f"| {ns / 1e3:.1f} | {before[:60]} | {after[:60]} |")
    if args.timeline:
        per_step = len(events) // n
        last = events[-per_step:]
        print("\n| t us | us | gap before | kernel | hlo op |\n|---|---|---|---|---|")
        t0, end = last[0][0], last[0][0]
        for start, ns, name, op in last:
            print(
                f"| {(start - t0) / 1e3:.1f} | {ns / 1e3:.1f} | {max(0, start - end) / 1e3:.1f} "
                f"| {name[:60]} | {op[:40]} |"
            )
            end = max(end, start + ns)


if __name__ == "__main__":
    main()
