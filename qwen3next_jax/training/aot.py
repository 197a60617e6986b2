"""Ahead-of-time compile of the full train step for a TPU pod topology, on any host.

With ``jax[tpu]`` installed at the running JAX version (it brings libtpu), a CPU machine can
describe a TPU topology (``jax.experimental.topologies``), build the experiment's mesh on its
abstract devices and compile the real TPU program: nothing runs, but XLA partitions, schedules
and allocates it, so the compile proves the config shards and reports what each chip needs.

    python train.py --config=configs/qwen3_next_80b_a3b.py --workdir=DIR --aot_topology=v5p:8x8x8

Multi-slice: ``config.dcn_mesh`` (product = number of slices) describes the parallelism across
slices; the topology string names one slice.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from qwen3next_jax import sharding
from qwen3next_jax.data.pipeline import EXAMPLE_KEYS
from qwen3next_jax.training import metrics as metrics_lib
from qwen3next_jax.training import train_step
from qwen3next_jax.training.loop import check_divisible, validate

GiB = 2**30

# HBM per chip by PEAK_TFLOPS name (metrics._KIND_PATTERNS maps device_kind to these names).
HBM_BYTES: dict[str, int] = {
    "TPU v4": 32 * GiB,
    "TPU v5e": 16 * GiB,
    "TPU v5p": 95 * GiB,
    "TPU v6e": 32 * GiB,
}
MFU_POINTS = (0.4, 0.6)


class AotError(ValueError):
    """A bad topology or a program that does not fit; the message is one sentence."""


def chip_name(device_kind: str) -> str | None:
    """'TPU v5p' etc. for a jax device_kind ('TPU v5', 'TPU v6 lite', ...); None if unknown."""
    for pattern, key in metrics_lib._KIND_PATTERNS:
        if pattern in device_kind.lower():
            return key
    return None


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
    """Abstract TPU devices of ``num_slices`` slices of ``topology`` (e.g. 'v5p:8x8x8')."""
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(
            f"--aot_topology={topology} needs libtpu: install jax[tpu]=={jax.__version__} "
            "(pip install -r requirements-tpu.txt)."
        )
    # libtpu takes a host-wide lock by default, so a second compiling process (a test worker,
    # another sweep point) would fail; compiling for abstract devices touches no TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError with a long text
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AotError(
            f"--aot_topology={topology!r} is not a TPU topology libtpu can build ({reason}); "
            "expected a name like v5p:8x8x8 or v6e:16x16."
        ) from None
    devices = list(desc.devices)
    if chip_name(devices[0].device_kind) not in HBM_BYTES:
        raise AotError(
            f"--aot_topology={topology!r} gives {devices[0].device_kind!r} chips, whose HBM size "
            f"is unknown here; supported: {', '.join(HBM_BYTES)}."
        )
    return devices


def abstract_batch(config: ml_collections.ConfigDict, batch_sharding) -> dict:
    shape = (int(config.global_batch_size), int(config.data.seq_len))
    return {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding) for k in EXAMPLE_KEYS
    }


def _resolved_backends(mcfg, mesh, batch_rows: int, seq_len: int) -> dict[str, str]:
    """The kernels the compiled step uses; ``batch_rows`` is one micro-batch's sequences."""
    from qwen3next_jax.ops import attention, attention_splash, delta_rule, moe

    with sharding.use_mesh(mesh):
        gdn = mcfg.gdn_backend
        if gdn == "auto":
            gdn = delta_rule.resolve_auto()
        attn = attention.resolve_backend(mcfg.attention_backend)
        if attn == "splash" and mcfg.attention_backend == "auto":
            shape = lambda heads: jax.ShapeDtypeStruct(  # noqa: E731
                (batch_rows, seq_len, heads, mcfg.head_dim), jnp.dtype(mcfg.dtype)
            )
            q, k = shape(mcfg.num_attention_heads), shape(mcfg.num_key_value_heads)
            if not attention_splash.supports(q, k):
                attn = "xla (splash cannot take these shapes)"
        return {
            "attention": attn,
            "gated_deltanet": gdn,
            "moe": moe._resolve_backend(mcfg.moe_backend),
        }


_OOM = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory.*?\(([\d.]+)([KMGT])\)", re.S)


def _compile_oom_bytes(err: Exception) -> int | None:
    """Bytes of temporaries XLA's TPU compiler said it needs, if ``err`` is its out-of-HBM stop."""
    m = _OOM.search(str(err))
    if m is None:
        return None
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def _flops_per_chip(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jaxlibs: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


@dataclasses.dataclass(frozen=True)
class MemoryParts:
    """Per-chip bytes of a compiled program; ``total`` is the sum of the four parts."""

    arguments: int
    outputs: int  # outputs that do not reuse a donated argument's buffer
    temporaries: int
    generated_code: int
    aliased: int  # donated argument bytes reused by outputs (inside `arguments`)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries + self.generated_code

    @classmethod
    def of(cls, compiled) -> MemoryParts:
        m = compiled.memory_analysis()
        return cls(
            arguments=int(m.argument_size_in_bytes),
            outputs=int(m.output_size_in_bytes - m.alias_size_in_bytes),
            temporaries=int(m.temp_size_in_bytes),
            generated_code=int(m.generated_code_size_in_bytes),
            aliased=int(m.alias_size_in_bytes),
        )


def compile_train_step(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
    """Compiles the train step of ``config`` for ``topology`` and returns the report dict.

    Raises AotError (one sentence) for a bad topology or mesh; a program that does not fit HBM
    is reported with ``fits: false``, not raised.
    """
    validate(config)
    dcn = config.get("dcn_mesh")
    num_slices = 1
    if dcn is not None:
        for v in dcn.to_dict().values():
            num_slices *= max(int(v), 1)
    devices = topology_devices(topology, num_slices)
    try:
        mesh = sharding.mesh_from_config(config, devices)
        check_divisible(config, mesh)
    except ValueError as e:
        raise AotError(f"{e} (topology {topology}, {len(devices)} chips)") from None
    mcfg = train_step.model_config_from(config)
    trainer = train_step.build(config, mesh)
    state = train_step.abstract_with_shardings(trainer)
    batch = abstract_batch(config, trainer.batch_sharding)

    t0 = time.perf_counter()
    lowered = trainer.train_step.lower(state, batch)
    t1 = time.perf_counter()
    # A TPU executable cannot be read back by this (CPU) client: keep it out of any persistent
    # compilation cache rather than leave entries that only produce warnings later.
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compiled, oom = None, None
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError; anything else re-raised
        oom = _compile_oom_bytes(e)
        if oom is None:
            raise
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
    t2 = time.perf_counter()

    chips = len(devices)
    kind = devices[0].device_kind
    name = chip_name(kind)
    hbm = HBM_BYTES[name]
    # XLA refuses to finish a program whose temporaries alone exceed HBM and reports only that
    # figure: the other parts are then unknown (None) and the total a lower bound.
    mem = MemoryParts(0, 0, oom, 0, 0) if compiled is None else MemoryParts.of(compiled)
    peak = metrics_lib.peak_flops_per_device(kind)
    tokens = int(config.global_batch_size) * int(config.data.seq_len)
    model_flops = metrics_lib.flops_per_token(mcfg, int(config.data.seq_len))["train"] * tokens
    compiled_flops_chip = None if compiled is None else _flops_per_chip(compiled)
    compiled_flops = None if compiled_flops_chip is None else compiled_flops_chip * chips

    def step_seconds(flops):
        if flops is None or not peak:
            return None
        return {f"{m:.0%}": flops / (chips * peak * m) for m in MFU_POINTS}

    params = metrics_lib.count_params(mcfg)
    return {
        "topology": topology,
        "num_slices": num_slices,
        "chips": chips,
        "device_kind": kind,
        "chip": name,
        "mesh": {a: int(s) for a, s in mesh.shape.items()},
        "global_batch_size": int(config.global_batch_size),
        "seq_len": int(config.data.seq_len),
        "micro_batches": int(config.micro_batches),
        "tokens_per_step": tokens,
        "params": params,
        "backends": _resolved_backends(
            mcfg,
            mesh,
            int(config.global_batch_size) // int(config.micro_batches),
            int(config.data.seq_len),
        ),
        "remat_policy": mcfg.remat_policy,
        "per_chip_bytes": {
            "arguments": mem.arguments if compiled else None,
            "outputs": mem.outputs if compiled else None,
            "temporaries": mem.temporaries,
            "generated_code": mem.generated_code if compiled else None,
            "total": mem.total,
            "aliased_donations": mem.aliased if compiled else None,
        },
        "compiled": compiled is not None,
        "note": None
        if compiled
        else "XLA stopped the compile: its temporaries alone exceed HBM; total is a lower bound.",
        "hbm_bytes_per_chip": hbm,
        "fits": mem.total <= hbm,
        "headroom_fraction": 1.0 - mem.total / hbm,
        "flops_per_step": {
            "compiled": compiled_flops,
            "model": model_flops,
        },
        "peak_flops_per_chip": peak,
        "step_seconds_at_mfu": {
            "compiled": step_seconds(compiled_flops),
            "model": step_seconds(model_flops),
        },
        "compile_seconds": {"lower": t1 - t0, "compile": t2 - t1},
        "jax": jax.__version__,
        "libtpu": _version("libtpu"),
        "date": datetime.date.today().isoformat(),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def format_report(r: dict[str, Any]) -> str:
    """A small human-readable table of a report."""

    def gib(b):
        if b is None:
            return "unknown (compile stopped)"
        return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2**20:.1f} MiB"

    def secs(t):
        return f"{t:.3f} s" if t >= 1 else f"{t * 1e3:.2f} ms"

    b = r["per_chip_bytes"]
    mesh = " ".join(f"{a}={s}" for a, s in r["mesh"].items() if s > 1) or "1 device"
    rows = [
        ("topology", f"{r['topology']} x {r['num_slices']} slice(s): {r['chips']} x {r['chip']}"),
        ("mesh", mesh),
        ("batch", f"{r['global_batch_size']} x {r['seq_len']} tokens"),
        ("backends", ", ".join(f"{k} {v}" for k, v in r["backends"].items())),
        ("arguments / chip", gib(b["arguments"])),
        ("outputs / chip", gib(b["outputs"])),
        ("temporaries / chip", gib(b["temporaries"])),
        ("code / chip", gib(b["generated_code"])),
        (
            "total / chip",
            f"{'at least ' if not r['compiled'] else ''}{gib(b['total'])} of "
            f"{gib(r['hbm_bytes_per_chip'])} HBM",
        ),
        ("fits", f"{r['fits']} ({r['headroom_fraction']:.1%} headroom)"),
    ]
    for src in ("model", "compiled"):
        flops = r["flops_per_step"][src]
        if flops is not None:
            rows.append((f"{src} FLOPs / step", f"{flops:.3e}"))
            at = r["step_seconds_at_mfu"][src]
            if at:
                times = ", ".join(f"{secs(v)} at {k} MFU" for k, v in at.items())
                rows.append((f"step time ({src})", times))
    c = r["compile_seconds"]
    rows.append(("compile", f"{c['lower']:.1f} s lower + {c['compile']:.1f} s compile"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def run(config: ml_collections.ConfigDict, workdir: str, topology: str) -> dict[str, Any]:
    """Compiles, prints the table, writes ``workdir/aot_report.json`` and raises AotError (after
    writing) if the program does not fit per-chip HBM."""
    report = compile_train_step(config, topology)
    print(format_report(report))
    print(f"report: {write_report(report, workdir)}")
    check_fits(report)
    return report


def write_report(report: dict[str, Any], workdir: str) -> str:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "aot_report.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
    return path


def check_fits(report: dict[str, Any]) -> None:
    if not report["fits"]:
        b = report["per_chip_bytes"]["total"]
        least = "" if report["compiled"] else "at least "
        raise AotError(
            f"the train step needs {least}{b / GiB:.1f} GiB per chip but a {report['chip']} "
            f"chip has {report['hbm_bytes_per_chip'] / GiB:.0f} GiB; shard more (mesh), shrink "
            "global_batch_size or raise micro_batches."
        )
