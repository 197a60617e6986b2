"""Analytic parameter and FLOP counts, device peaks, throughput/MFU, and the metrics writer.

FLOP conventions (per token, forward; training = 3 x forward):
- every matmul with an *active* weight costs 2 FLOPs per weight: projections, lm_head, router,
  the top-k routed experts, shared expert and its gate, the depthwise convs, the MTP fc. The
  embedding lookup, norms and elementwise gates cost nothing.
- full attention scores + values: 2 * 2 * T * N * H per token for a full T x T square, halved for
  the causal mask (MaxText's convention), i.e. 2 * T * N * H.
- Gated DeltaNet core: 8 * HV * Dk * Dv per token (MaxText / Megatron; performance-anchors.md).
- each MTP depth: fc (2D -> D), one full-attention MoE decoder layer, and the shared lm_head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwen3next_jax.config import FULL, LINEAR, ModelConfig

# ----------------------------------------------------------------------------- parameter count


def _attention_params(cfg: ModelConfig) -> int:
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_and_gate = D * N * H * (2 if cfg.attn_output_gate else 1)
    return q_and_gate + 2 * D * K * H + N * H * D + 2 * H  # + q_norm, k_norm


def _gdn_params(cfg: ModelConfig) -> int:
    D, HV = cfg.hidden_size, cfg.linear_num_value_heads
    key_dim, value_dim = cfg.gdn_key_dim, cfg.gdn_value_dim
    proj = D * (2 * key_dim + 2 * value_dim + 2 * HV)  # q, k, v, z, b, a
    conv = cfg.linear_conv_kernel_dim * (2 * key_dim + value_dim)
    return proj + conv + 2 * HV + cfg.linear_value_head_dim + value_dim * D  # A_log, dt_bias, norm


def _ffn_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, active) parameters of one feed-forward block."""
    D = cfg.hidden_size
    if not moe:
        dense = 3 * D * cfg.intermediate_size
        return dense, dense
    expert = 3 * D * cfg.moe_intermediate_size
    shared = (
        3 * D * cfg.shared_expert_intermediate_size + D
        if cfg.shared_expert_intermediate_size
        else 0
    )
    router = D * cfg.num_experts
    return (
        router + cfg.num_experts * expert + shared,
        router + cfg.num_experts_per_tok * expert + shared,
    )


def _layer_params(cfg: ModelConfig, layer_type: str, moe: bool) -> tuple[int, int]:
    mixer = _gdn_params(cfg) if layer_type == LINEAR else _attention_params(cfg)
    ffn_total, ffn_active = _ffn_params(cfg, moe)
    norms = 2 * cfg.hidden_size
    return mixer + ffn_total + norms, mixer + ffn_active + norms


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: 'total' / 'active' exclude MTP heads, '*_with_mtp' include them.

    'active' is what one token touches: everything but the unselected routed experts (the
    embedding table and lm_head included). 'embedding' is the input table alone.
    """
    D, V = cfg.hidden_size, cfg.vocab_size
    embed = V * D
    lm_head = 0 if cfg.tie_word_embeddings else D * V
    total = active = embed + lm_head + D  # + final norm
    for i, layer_type in enumerate(cfg.resolved_layer_types):
        t, a = _layer_params(cfg, layer_type, i not in cfg.mlp_only_layers)
        total, active = total + t, active + a
    mtp_t, mtp_a = _layer_params(cfg, FULL, True)
    mtp_extra = 2 * D + 2 * D * D + D  # two pre-fc norms, fc, final norm
    n_mtp = cfg.num_mtp_layers
    return {
        "total": total,
        "active": active,
        "total_with_mtp": total + n_mtp * (mtp_t + mtp_extra),
        "active_with_mtp": active + n_mtp * (mtp_a + mtp_extra),
        "embedding": embed,
    }


# ---------------------------------------------------------------------------------- FLOP count


def _attention_flops(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """(projection, core) forward FLOPs per token of one gated-attention layer."""
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    proj = 2 * (D * N * H * (2 if cfg.attn_output_gate else 1) + 2 * D * K * H + N * H * D)
    core = 2 * 2 * seq_len * N * H / 2  # QK^T and PV over the causal half of the square
    return proj, core


def _ffn_flops(cfg: ModelConfig, moe: bool) -> dict[str, float]:
    D = cfg.hidden_size
    if not moe:
        return {"dense_mlp": 2 * 3 * D * cfg.intermediate_size}
    Fs = cfg.shared_expert_intermediate_size
    return {
        "moe_router": 2 * D * cfg.num_experts,
        "moe_routed": 2 * cfg.num_experts_per_tok * 3 * D * cfg.moe_intermediate_size,
        "moe_shared": (2 * 3 * D * Fs + 2 * D) if Fs else 0,  # shared expert + its sigmoid gate
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
    """Analytic FLOPs per token: {'forward', 'train' (= 3 x forward), 'breakdown' (forward)}."""
    D, V, HV = cfg.hidden_size, cfg.vocab_size, cfg.linear_num_value_heads
    b: dict[str, float] = dict.fromkeys(
        [
            "lm_head",
            "attention_proj",
            "attention_core",
            "gdn_proj",
            "gdn_conv",
            "gdn_core",
            "moe_router",
            "moe_routed",
            "moe_shared",
            "dense_mlp",
            "mtp",
        ],
        0.0,
    )
    b["lm_head"] = 2 * D * V
    gdn_proj = 2 * D * (2 * cfg.gdn_key_dim + 2 * cfg.gdn_value_dim + 2 * HV)
    gdn_proj += 2 * cfg.gdn_value_dim * D  # out_proj
    gdn_conv = 2 * cfg.linear_conv_kernel_dim * (2 * cfg.gdn_key_dim + cfg.gdn_value_dim)
    gdn_core = 8 * HV * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    attn_proj, attn_core = _attention_flops(cfg, seq_len)
    for i, layer_type in enumerate(cfg.resolved_layer_types):
        if layer_type == LINEAR:
            b["gdn_proj"] += gdn_proj
            b["gdn_conv"] += gdn_conv
            b["gdn_core"] += gdn_core
        else:
            b["attention_proj"] += attn_proj
            b["attention_core"] += attn_core
        for k, v in _ffn_flops(cfg, i not in cfg.mlp_only_layers).items():
            b[k] += v
    mtp_depth = 2 * (2 * D) * D + attn_proj + attn_core + sum(_ffn_flops(cfg, True).values())
    b["mtp"] = cfg.num_mtp_layers * (mtp_depth + 2 * D * V)
    forward = float(sum(b.values()))
    return {
        "forward": forward,
        "train": 3.0 * forward,
        "breakdown": {k: float(v) for k, v in b.items()},
    }


# ------------------------------------------------------------------------------ device peaks

# Dense bf16 datasheet peaks, TFLOP/s per device (chip).
PEAK_TFLOPS: dict[str, float | None] = {
    "H100": 989.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6e": 918.0,
    "cpu": None,
}

# (lower-case substring of jax's device_kind, PEAK_TFLOPS key); first match wins, so the more
# specific names come first ("TPU v5 lite" is v5e, a bare "TPU v5" is v5p).
_KIND_PATTERNS = (
    ("h100 pcie", "H100 PCIe"),
    ("h200", "H200"),
    ("h100", "H100"),
    ("a100", "A100"),
    ("v5 lite", "TPU v5e"),
    ("v5e", "TPU v5e"),
    ("v5p", "TPU v5p"),
    ("tpu v5", "TPU v5p"),
    ("v6 lite", "TPU v6e"),
    ("v6e", "TPU v6e"),
    ("tpu v4", "TPU v4"),
    ("cpu", "cpu"),
)


def peak_flops_per_device(device) -> float | None:
    """Datasheet bf16 peak in FLOP/s for a jax Device (or a device_kind string); None if unknown."""
    kind = (device if isinstance(device, str) else getattr(device, "device_kind", "")).lower()
    for pattern, key in _KIND_PATTERNS:
        if pattern in kind:
            tflops = PEAK_TFLOPS[key]
            return None if tflops is None else tflops * 1e12
    return None


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Converts a step time into LLM throughput figures.

    ``flops_per_token`` is the training count (``flops_per_token(...)['train']``);
    ``peak_flops_per_device`` in FLOP/s, or None when unknown (then mfu is None).
    """

    tokens_per_step: int
    flops_per_token: float
    num_devices: int
    peak_flops_per_device: float | None = None

    def __call__(self, step_time_s: float) -> dict[str, float | None]:
        tokens_per_s = self.tokens_per_step / step_time_s
        flops_per_device = tokens_per_s * self.flops_per_token / self.num_devices
        peak = self.peak_flops_per_device
        return {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.num_devices,
            "tflops_per_device": flops_per_device / 1e12,
            "mfu": flops_per_device / peak if peak else None,
        }


# ------------------------------------------------------------------------------------ writing


def write_config(workdir: str | os.PathLike, config: Mapping[str, Any]) -> str:
    """Writes ``config`` as pretty, key-sorted JSON to workdir/config.json; returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return path


def _to_json_value(v: Any) -> Any:
    """Floats for numbers (non-finite -> None, keeping the file strict JSON); lists stay lists."""
    if v is None or isinstance(v, str):
        return v
    a = np.asarray(v)
    if a.dtype.kind not in "biuf":
        return str(v)
    if a.ndim == 0:
        x = float(a)
        return x if math.isfinite(x) else None
    return [_to_json_value(x) for x in a.tolist()]


class MetricsWriter:
    """Per logged step: one JSON line in workdir/metrics.jsonl, TensorBoard scalars in workdir,
    and a tqdm bar (postfix loss, tokens/s, MFU; ETA from the bar's rate). Only the chief writes.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        enable_tensorboard: bool = True,
        is_chief: bool = True,
        progress_bar: bool = True,
    ):
        self.is_chief = is_chief
        self._jsonl = self._tb = self._bar = None
        self._postfix: dict[str, str] = {}
        if not is_chief:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        # Line-buffered append: a killed run loses at most the line being written.
        self._jsonl = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives until close()
        if enable_tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(workdir))
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs ``metrics`` at ``step``; non-scalar values go to the JSON line only."""
        if not self.is_chief:
            return
        record = {"step": int(step)}
        record.update({k: _to_json_value(v) for k, v in metrics.items() if k != "step"})
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, global_step=int(step))
            self._tb.flush()
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(int(step) - self._bar.n)
            for key, label, fmt in (
                ("loss", "loss", "{:.4f}"),
                ("tokens_per_s", "tok/s", "{:,.0f}"),
                ("mfu", "mfu", "{:.1%}"),
            ):
                if isinstance(record.get(key), float):
                    self._postfix[label] = fmt.format(record[key])
            self._bar.set_postfix(self._postfix, refresh=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
