"""Gated full attention: QK-norm, partial RoPE, GQA, sigmoid output gate (spec §2.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax import sharding
from qwen3next_jax.config import ModelConfig
from qwen3next_jax.layers import params
from qwen3next_jax.layers.norms import RMSNorm
from qwen3next_jax.ops import attention as attention_ops
from qwen3next_jax.ops import rotary


class GatedAttention(nnx.Module):
    """Query and gate projections are stored apart ([D, N, H] each); HF's per-head interleaved
    ``q_proj`` rows are split on load (qwen3next_jax.hf)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std, pdt = cfg.initializer_range, cfg.param_dtype
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        self.wq_DNH = params.normal(rngs, (D, N, H), ("embed", "heads", "head_dim"), std, pdt)
        if cfg.attn_output_gate:
            self.wgate_DNH = params.normal(
                rngs, (D, N, H), ("embed", "heads", "head_dim"), std, pdt
            )
        self.wk_DKH = params.normal(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), std, pdt)
        self.wv_DKH = params.normal(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), std, pdt)
        self.wo_NHD = params.normal(rngs, (N, H, D), ("heads", "head_dim", "embed"), std, pdt)
        self.q_norm = RMSNorm(H, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.k_norm = RMSNorm(H, eps=cfg.rms_norm_eps, param_dtype=pdt)

    def qkv(self, x_BTD: jax.Array, positions_BT: jax.Array):
        """Normed, rotated q [B,T,N,H]; k, v [B,T,K,H]; the gate [B,T,N,H] (or None)."""
        dt = self.dtype
        q_BTNH = self.q_norm(params.project(x_BTD, self.wq_DNH, "btd,dnh->btnh", dt))
        k_BTKH = self.k_norm(params.project(x_BTD, self.wk_DKH, "btd,dkh->btkh", dt))
        v_BTKH = params.project(x_BTD, self.wv_DKH, "btd,dkh->btkh", dt)
        cos, sin = rotary.rotary_cos_sin(positions_BT, self.cfg.rotary_dim, self.cfg.rope_theta)
        q_BTNH = rotary.apply_partial_rotary(q_BTNH, cos, sin)
        k_BTKH = rotary.apply_partial_rotary(k_BTKH, cos, sin)
        q_BTNH = sharding.constrain(q_BTNH, ("batch", "seq", "act_heads", None))
        gate_BTNH = None
        if self.cfg.attn_output_gate:
            gate_BTNH = params.project(x_BTD, self.wgate_DNH, "btd,dnh->btnh", dt)
        return q_BTNH, k_BTKH, v_BTKH, gate_BTNH

    def output(self, attn_BTNH: jax.Array, gate_BTNH: jax.Array | None) -> jax.Array:
        if gate_BTNH is not None:
            gated = attn_BTNH.astype(jnp.float32) * jax.nn.sigmoid(gate_BTNH.astype(jnp.float32))
            attn_BTNH = gated.astype(attn_BTNH.dtype)
        return params.project(attn_BTNH, self.wo_NHD, "btnh,nhd->btd", self.dtype)

    def __call__(
        self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None
    ) -> jax.Array:
        q_BTNH, k_BTKH, v_BTKH, gate_BTNH = self.qkv(x_BTD, positions_BT)
        attn_BTNH = attention_ops.causal_attention(
            q_BTNH,
            k_BTKH,
            v_BTKH,
            segment_ids_BT=segment_ids_BT,
            backend=self.cfg.attention_backend,
        )
        return self.output(attn_BTNH, gate_BTNH)
