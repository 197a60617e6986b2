"""ModelConfig: every hyperparameter of a Qwen3-Next-style model, validated up front.

Validation runs in ``__post_init__`` so a bad value is one clear sentence at construction time,
never a shape error deep inside a jit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

LINEAR = "linear_attention"
FULL = "full_attention"
_LAYER_TYPES = (LINEAR, FULL)
_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """Bad user input (config value, data, checkpoint): its message is one sentence naming the
    value and what was expected, and the entry points print it without a traceback."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters. Defaults are the published Qwen3-Next-80B-A3B (spec §1.1)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    # Explicit per-layer types win; otherwise layer i is full attention iff (i+1) % interval == 0.
    layer_types: tuple[str, ...] | None = None
    full_attention_interval: int = 4
    # Gated (full) attention.
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    partial_rotary_factor: float = 0.25
    rope_theta: float = 10_000_000.0
    attn_output_gate: bool = True
    max_position_embeddings: int = 262144
    # Gated DeltaNet (linear attention).
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    gdn_chunk_size: int = 64
    # Mixture of experts (every layer, as in the 80B model).
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    # Rescale every router row to one common L2 norm after init (σ-MoE), so no expert is favoured.
    router_init_normalize: bool = True
    # Dense SwiGLU width, used only by layers listed in mlp_only_layers.
    intermediate_size: int = 5120
    mlp_only_layers: tuple[int, ...] = ()
    # Embeddings, norms, heads.
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    num_mtp_layers: int = 1
    initializer_range: float = 0.02
    # Numerics: parameters (master weights) and activations/matmuls.
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    # Execution knobs (not architecture): scan over repeating super-blocks, remat, kernel backends.
    scan_layers: bool = True
    remat_policy: str = "none"  # none | full | dots_saveable
    attention_backend: str = "auto"  # auto | xla | cudnn | splash | splash_interpret
    gdn_backend: str = "auto"  # auto | chunk | chunk_mxu | recurrent | pallas | pallas_interpret
    moe_backend: str = "auto"
    moe_capacity_factor: float | None = None
    # Router softmax + top-k: auto (the fused Pallas kernels on GPU when E is a power of 2) | xla
    # | pallas (interpret mode off GPU).
    router_impl: str = "auto"

    def __post_init__(self):
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        for err in self._errors():
            raise ConfigError(err)

    # ----------------------------------------------------------------------------------- derived
    @property
    def resolved_layer_types(self) -> tuple[str, ...]:
        if self.layer_types is not None:
            return self.layer_types
        n = self.full_attention_interval
        return tuple(FULL if (i + 1) % n == 0 else LINEAR for i in range(self.num_hidden_layers))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def gdn_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def gdn_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    # -------------------------------------------------------------------------------- validation
    def _errors(self) -> list[str]:
        errs = []

        def positive(*names):
            for name in names:
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    errs.append(f"{name}={v!r} must be a positive integer.")

        positive(
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "full_attention_interval",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
            "gdn_chunk_size",
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "intermediate_size",
            "max_position_embeddings",
        )
        if errs:
            return errs
        if self.num_attention_heads % self.num_key_value_heads:
            errs.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            errs.append(
                f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                f"linear_num_key_heads={self.linear_num_key_heads}."
            )
        if self.num_experts_per_tok > self.num_experts:
            errs.append(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"num_experts={self.num_experts}."
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            errs.append(f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1].")
        elif self.rotary_dim % 2 or self.rotary_dim == 0:
            errs.append(
                f"head_dim * partial_rotary_factor = {self.head_dim} * "
                f"{self.partial_rotary_factor} = {self.rotary_dim} must be a positive even number."
            )
        if self.rope_theta <= 0:
            errs.append(f"rope_theta={self.rope_theta} must be positive.")
        if self.shared_expert_intermediate_size < 0:
            errs.append(
                f"shared_expert_intermediate_size={self.shared_expert_intermediate_size} must be "
                "non-negative (0 disables the shared expert)."
            )
        if self.num_mtp_layers < 0:
            errs.append(f"num_mtp_layers={self.num_mtp_layers} must be non-negative.")
        if not self.rms_norm_eps > 0:
            errs.append(f"rms_norm_eps={self.rms_norm_eps} must be positive.")
        if self.initializer_range <= 0:
            errs.append(f"initializer_range={self.initializer_range} must be positive.")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                errs.append(f"{name}={getattr(self, name)!r} must be one of {_DTYPES}.")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                errs.append(
                    f"layer_types has {len(self.layer_types)} entries but num_hidden_layers="
                    f"{self.num_hidden_layers}."
                )
            bad = [t for t in self.layer_types if t not in _LAYER_TYPES]
            if bad:
                errs.append(f"layer_types contains {bad[0]!r}; expected one of {_LAYER_TYPES}.")
        bad_mlp = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad_mlp:
            errs.append(
                f"mlp_only_layers contains {bad_mlp[0]}, outside 0..{self.num_hidden_layers - 1}."
            )
        if self.remat_policy not in ("none", "full", "dots_saveable"):
            errs.append(
                f"remat_policy={self.remat_policy!r} must be one of 'none', 'full', "
                "'dots_saveable'."
            )
        if self.attention_backend not in ("auto", "xla", "cudnn", "splash", "splash_interpret"):
            errs.append(
                f"attention_backend={self.attention_backend!r} must be one of 'auto', 'xla', "
                "'cudnn', 'splash', 'splash_interpret'."
            )
        gdn_backends = ("auto", "chunk", "chunk_mxu", "recurrent", "pallas", "pallas_interpret")
        if self.gdn_backend not in gdn_backends:
            errs.append(
                f"gdn_backend={self.gdn_backend!r} must be one of 'auto', 'chunk', 'chunk_mxu', "
                "'recurrent', 'pallas', 'pallas_interpret'."
            )
        moe_backends = (
            "auto",
            "ragged_dot",
            "tokamax",
            "padded",
            "pallas",
            "pallas_fused",
            "megablox",
            "megablox_interpret",
            "dense",
        )
        if self.moe_backend not in moe_backends:
            errs.append(
                f"moe_backend={self.moe_backend!r} must be one of 'auto', 'ragged_dot', 'tokamax', "
                "'padded', 'pallas', 'pallas_fused', 'megablox', 'megablox_interpret', 'dense'."
            )
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            errs.append(f"moe_capacity_factor={self.moe_capacity_factor} must be positive or None.")
        if self.router_impl not in ("auto", "xla", "pallas"):
            errs.append(f"router_impl={self.router_impl!r} must be one of 'auto', 'xla', 'pallas'.")
        return errs

    # ------------------------------------------------------------------------------- conversion
    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"Unknown ModelConfig field {unknown[0]!r}; known fields: {sorted(names)}."
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | str, **overrides) -> ModelConfig:
        """Builds a config from a Hugging Face ``config.json`` dict (or its path).

        MTP depth comes from ``num_nextn_predict_layers`` (1 when absent, as serving engines
        assume).
        """
        if isinstance(hf, str):
            with open(hf) as f:
                hf = json.load(f)
        hf = dict(hf)
        model_type = hf.get("model_type", "qwen3_next")
        if model_type != "qwen3_next":
            raise ValueError(f"config.json has model_type={model_type!r}; expected 'qwen3_next'.")
        rope = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        partial = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ValueError(f"rope_scaling={scaling!r} is not supported; expected null.")
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            layer_types=tuple(hf["layer_types"]) if hf.get("layer_types") else None,
            full_attention_interval=hf.get("full_attention_interval", 4),
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf["num_key_value_heads"],
            head_dim=hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
            partial_rotary_factor=float(partial),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            linear_num_key_heads=hf["linear_num_key_heads"],
            linear_num_value_heads=hf["linear_num_value_heads"],
            linear_key_head_dim=hf["linear_key_head_dim"],
            linear_value_head_dim=hf["linear_value_head_dim"],
            linear_conv_kernel_dim=hf.get("linear_conv_kernel_dim", 4),
            num_experts=hf["num_experts"],
            num_experts_per_tok=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0),
            norm_topk_prob=hf.get("norm_topk_prob", True),
            intermediate_size=hf.get("intermediate_size", 5632),
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            num_mtp_layers=hf.get("num_nextn_predict_layers", 1),
            initializer_range=hf.get("initializer_range", 0.02),
        )
        if hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError(
                f"decoder_sparse_step={hf['decoder_sparse_step']} is not supported; expected 1 "
                "(use mlp_only_layers for dense layers)."
            )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict for this architecture."""
        return {
            "architectures": ["Qwen3NextForCausalLM"],
            "model_type": "qwen3_next",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "layer_types": list(self.resolved_layer_types),
            "full_attention_interval": self.full_attention_interval,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
            "norm_topk_prob": self.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(self.mlp_only_layers),
            "intermediate_size": self.intermediate_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "rope_scaling": None,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
        }


def qwen3_next_80b_a3b(**overrides) -> ModelConfig:
    """The published Qwen3-Next-80B-A3B architecture (spec §1.1), exactly."""
    return ModelConfig(**overrides)


def tiny(**overrides) -> ModelConfig:
    """A CPU-sized model with every mechanism on (GDN:attention 3:1, MoE + shared expert, MTP)."""
    kw: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        partial_rotary_factor=0.25,
        rope_theta=10_000.0,
        max_position_embeddings=4096,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        intermediate_size=128,
        num_mtp_layers=1,
        dtype="float32",
    )
    kw.update(overrides)
    return ModelConfig(**kw)
