"""Sparse MoE block: fp32 softmax router, top-k, routed SwiGLU experts, gated shared expert.

Spec §2.5. The dispatch (how tokens reach their experts, which grouped-matmul backend, expert
parallelism) lives in qwen3next_jax.ops.moe and is chosen by ``cfg.moe_backend``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax import sharding
from qwen3next_jax.config import ModelConfig
from qwen3next_jax.layers import params
from qwen3next_jax.layers.mlp import SwiGLU
from qwen3next_jax.ops import moe as moe_ops
from qwen3next_jax.ops.linear import einsum_f32


def normalize_router_rows(w_DE: jax.Array, std: float) -> jax.Array:
    """Rescales every expert's router column to the expected norm std·sqrt(D) (σ-MoE init).

    With equal-norm rows no expert starts with a systematically larger logit, so early routing
    is unbiased.
    """
    norms_E = jnp.linalg.norm(w_DE.astype(jnp.float32), axis=0, keepdims=True)
    target = std * jnp.sqrt(jnp.float32(w_DE.shape[0]))
    return (w_DE.astype(jnp.float32) * (target / norms_E)).astype(w_DE.dtype)


class SparseMoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        std, pdt = cfg.initializer_range, cfg.param_dtype
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        self.router_DE = params.normal(rngs, (D, E), ("embed", None), std, pdt)
        if cfg.router_init_normalize:
            self.router_DE[...] = normalize_router_rows(self.router_DE[...], std)
        ax = ("expert", "embed", "expert_mlp")
        self.w_gate_EDF = params.normal(rngs, (E, D, F), ax, std, pdt)
        self.w_up_EDF = params.normal(rngs, (E, D, F), ax, std, pdt)
        self.w_down_EFD = params.normal(
            rngs, (E, F, D), ("expert", "expert_mlp", "embed"), std, pdt
        )
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(
                D,
                cfg.shared_expert_intermediate_size,
                std=std,
                dtype=self.dtype,
                param_dtype=pdt,
                rngs=rngs,
            )
            self.shared_gate_D1 = params.normal(rngs, (D, 1), ("embed", None), std, pdt)

    def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None):
        """Returns (y [B,T,D], stats); stats hold float32 routing sums over valid tokens:
        counts_E (routed slots per expert), prob_sum_E (router probability mass), num_tokens,
        z_sum (Σ logsumexp²), entropy_sum (Σ routing entropy) and dropped_fraction."""
        cfg = self.cfg
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D).astype(self.dtype)
        logits_NE = moe_ops.router_logits(x_ND, self.router_DE[...])
        ctx = sharding.current()
        weights_NK, idx_NK, probs_NE = moe_ops.router_topk(
            logits_NE,
            cfg.num_experts_per_tok,
            cfg.norm_topk_prob,
            impl=cfg.router_impl,
            mesh=None if ctx is None else ctx.mesh,
        )
        y_ND, op_stats = moe_ops.routed_experts(
            x_ND,
            weights_NK,
            idx_NK,
            self.w_gate_EDF[...].astype(self.dtype),
            self.w_up_EDF[...].astype(self.dtype),
            self.w_down_EFD[...].astype(self.dtype),
            backend=cfg.moe_backend,
            capacity_factor=cfg.moe_capacity_factor,
            mesh=None if ctx is None else ctx.mesh,
        )
        y_BTD = y_ND.reshape(B, T, D)
        if cfg.shared_expert_intermediate_size:
            shared_BTD = self.shared_expert(x_BTD)
            gate_BT1 = jax.nn.sigmoid(
                einsum_f32("btd,do->bto", x_BTD.astype(self.dtype), self.shared_gate_D1[...])
            )
            y_BTD = y_BTD.astype(jnp.float32) + gate_BT1 * shared_BTD.astype(jnp.float32)
            y_BTD = y_BTD.astype(self.dtype)

        valid_N = (
            jnp.ones((B * T,), jnp.float32)
            if valid_BT is None
            else (valid_BT.reshape(B * T).astype(jnp.float32))
        )
        counts_E = (
            jnp.zeros((cfg.num_experts,), jnp.float32)
            .at[idx_NK.reshape(-1)]
            .add(jnp.repeat(valid_N, cfg.num_experts_per_tok))
        )
        lse_N = jax.nn.logsumexp(logits_NE, axis=-1)
        entropy_N = -jnp.sum(probs_NE * jnp.log(jnp.maximum(probs_NE, 1e-30)), axis=-1)
        stats = {
            "counts_E": jax.lax.stop_gradient(counts_E),
            "prob_sum_E": jnp.einsum("n,ne->e", valid_N, probs_NE),
            "num_tokens": jnp.sum(valid_N),
            "z_sum": jnp.sum(valid_N * lse_N * lse_N),
            "entropy_sum": jax.lax.stop_gradient(jnp.sum(valid_N * entropy_N)),
            "dropped_fraction": jnp.asarray(op_stats["dropped_fraction"], jnp.float32),
        }
        return y_BTD, stats
