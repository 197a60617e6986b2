"""qwen3next_jax: pretraining Qwen3-Next-style models (hybrid Gated DeltaNet + gated attention,
ultra-sparse MoE, multi-token prediction) in JAX / Flax NNX."""

from qwen3next_jax.config import ModelConfig
from qwen3next_jax.hf import from_hf, to_hf
from qwen3next_jax.inference.generate import generate
from qwen3next_jax.model import ModelOutput, Qwen3Next

__all__ = ["ModelConfig", "ModelOutput", "Qwen3Next", "from_hf", "generate", "to_hf"]
