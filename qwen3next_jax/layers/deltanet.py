"""Gated DeltaNet: projections, short causal conv, gates, L2-normalised q/k, delta rule, gated norm.

Spec §2.4. Projections are stored per part ([D, heads, dim]); HF's grouped ``in_proj_qkvz`` /
``in_proj_ba`` rows are de-interleaved on load (qwen3next_jax.hf), so the conv channel order
[Q | K | V] of the spec is the concatenation of the three conv weights here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax import sharding
from qwen3next_jax.config import ModelConfig
from qwen3next_jax.layers import params
from qwen3next_jax.layers.norms import GatedRMSNorm
from qwen3next_jax.ops import conv as conv_ops
from qwen3next_jax.ops import delta_rule
from qwen3next_jax.ops.linear import einsum_f32


class DeltaNetCache(NamedTuple):
    """Decode state of one layer: the last K-1 pre-conv inputs per part, and the fp32 state."""

    conv_q: jax.Array  # [B, Kc-1, HK*Dk]
    conv_k: jax.Array  # [B, Kc-1, HK*Dk]
    conv_v: jax.Array  # [B, Kc-1, HV*Dv]
    state: jax.Array  # [B, HV, Dk, Dv] float32


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x * rsqrt(sum(x²) + eps) over the last axis in float32 (fla's rule, not F.normalize)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, HK, HV = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
        Dk, Dv, Kc = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
        std, pdt = cfg.initializer_range, cfg.param_dtype
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        ax_k = ("embed", "heads", "head_dim")
        self.wq_DHK = params.normal(rngs, (D, HK, Dk), ax_k, std, pdt)
        self.wk_DHK = params.normal(rngs, (D, HK, Dk), ax_k, std, pdt)
        self.wv_DHV = params.normal(rngs, (D, HV, Dv), ax_k, std, pdt)
        self.wz_DHV = params.normal(rngs, (D, HV, Dv), ax_k, std, pdt)
        self.wb_DH = params.normal(rngs, (D, HV), ("embed", "heads"), std, pdt)
        self.wa_DH = params.normal(rngs, (D, HV), ("embed", "heads"), std, pdt)
        ax_c = ("conv", "heads", "head_dim")
        self.conv_q_KHD = params.normal(rngs, (Kc, HK, Dk), ax_c, std, pdt)
        self.conv_k_KHD = params.normal(rngs, (Kc, HK, Dk), ax_c, std, pdt)
        self.conv_v_KHD = params.normal(rngs, (Kc, HV, Dv), ax_c, std, pdt)
        # A = U(0.01, 16) as HF does (the lower bound keeps log A finite); kept in float32 always
        # because exp(A_log) overflows in half precision (spec P7).
        a_init = jax.random.uniform(rngs.params(), (HV,), jnp.float32, 0.01, 16.0)
        self.A_log = nnx.Param(jnp.log(a_init), axes=("heads",))
        self.dt_bias = nnx.Param(jnp.ones((HV,), jnp.float32), axes=("heads",))
        self.norm = GatedRMSNorm(Dv, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.wo_HVD = params.normal(rngs, (HV, Dv, D), ("heads", "head_dim", "embed"), std, pdt)

    def _conv(self, x_BTHD, w, segment_ids_BT, state):
        B, T, H, Dh = x_BTHD.shape
        x_BTC = x_BTHD.reshape(B, T, H * Dh)
        w_KC = w[...].reshape(w.shape[0], H * Dh)
        y_BTC = conv_ops.causal_depthwise_conv(
            x_BTC, w_KC, segment_ids_BT=segment_ids_BT, state_BKmC=state
        )
        # The decode-time conv window is only needed when a cache is being carried.
        new_state = None if state is None else conv_ops.conv_state_after(x_BTC, w.shape[0], state)
        return jax.nn.silu(y_BTC).reshape(B, T, H, Dh), new_state

    def __call__(
        self,
        x_BTD: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: DeltaNetCache | None = None,
    ):
        """Returns y [B,T,D] in the compute dtype; with ``cache``, returns (y, new cache).

        Padding tokens (segment id 0) are zeroed before the projections so nothing of them reaches
        the conv window or the state (spec P17).
        """
        cfg, dt = self.cfg, self.dtype
        if segment_ids_BT is not None:
            x_BTD = jnp.where((segment_ids_BT != 0)[..., None], x_BTD, 0).astype(x_BTD.dtype)
        q_BTHK = params.project(x_BTD, self.wq_DHK, "btd,dhk->bthk", dt)
        k_BTHK = params.project(x_BTD, self.wk_DHK, "btd,dhk->bthk", dt)
        v_BTHV = params.project(x_BTD, self.wv_DHV, "btd,dhv->bthv", dt)
        z_BTHV = params.project(x_BTD, self.wz_DHV, "btd,dhv->bthv", dt)
        b_BTH = einsum_f32("btd,dh->bth", x_BTD.astype(dt), self.wb_DH[...])
        a_BTH = einsum_f32("btd,dh->bth", x_BTD.astype(dt), self.wa_DH[...])

        c = cache
        q_BTHK, cq = self._conv(q_BTHK, self.conv_q_KHD, segment_ids_BT, c and c.conv_q)
        k_BTHK, ck = self._conv(k_BTHK, self.conv_k_KHD, segment_ids_BT, c and c.conv_k)
        v_BTHV, cv = self._conv(v_BTHV, self.conv_v_KHD, segment_ids_BT, c and c.conv_v)

        beta_BTH = jax.nn.sigmoid(b_BTH)
        g_BTH = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a_BTH + self.dt_bias[...].astype(jnp.float32)
        )
        q_BTHK = l2norm(q_BTHK).astype(dt)
        k_BTHK = l2norm(k_BTHK).astype(dt)
        v_BTHV = sharding.constrain(v_BTHV, ("batch", "seq", "act_heads", None))

        o_BTHV, state = delta_rule.gated_delta_rule(
            q_BTHK,
            k_BTHK,
            v_BTHV,
            g_BTH,
            beta_BTH,
            initial_state=None if c is None else c.state,
            segment_ids=segment_ids_BT,
            chunk_size=cfg.gdn_chunk_size,
            backend=cfg.gdn_backend,
        )
        y_BTHV = self.norm(o_BTHV, z_BTHV)
        y_BTD = params.project(y_BTHV, self.wo_HVD, "bthv,hvd->btd", dt)
        if cache is None:
            return y_BTD
        return y_BTD, DeltaNetCache(cq, ck, cv, state)
