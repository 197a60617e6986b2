"""Qwen3Next: embedding, a scanned stack of hybrid decoder layers, final norm, lm_head, MTP heads.

The layer stack is stored as ``num_blocks`` stacked copies of one super-block (the smallest
repeating period of the layer pattern, e.g. 3 Gated DeltaNet + 1 gated attention layer), with a
leading 'layers' axis on every parameter. ``cfg.scan_layers`` runs it with ``jax.lax.scan``;
otherwise the same parameters are sliced and run in a Python loop, so both give the same model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from qwen3next_jax import sharding
from qwen3next_jax.config import FULL, LINEAR, ModelConfig
from qwen3next_jax.layers import params
from qwen3next_jax.layers.attention import GatedAttention
from qwen3next_jax.layers.deltanet import GatedDeltaNet
from qwen3next_jax.layers.mlp import SwiGLU
from qwen3next_jax.layers.moe import SparseMoE
from qwen3next_jax.layers.norms import RMSNorm
from qwen3next_jax.ops.linear import einsum_f32


@struct.dataclass
class ModelOutput:
    """logits [B,T,V] float32 (position t predicts token t+1), or None with compute_logits=False;
    mtp_logits [D,B,T,V] float32 (depth d at position t predicts token t+2+d) or None;
    hidden [B,T,D] post-final-norm; mtp_hidden [D,B,T,D] post-MTP-norm or None;
    router: dict of per-MoE-layer routing sums, each with a leading [num_moe_layers] axis
    (main stack first, then MTP layers)."""

    logits: jax.Array | None
    mtp_logits: jax.Array | None
    hidden: jax.Array
    mtp_hidden: jax.Array | None
    router: dict


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the segment id changes."""
    T = segment_ids_BT.shape[1]
    idx_T = jnp.arange(T, dtype=jnp.int32)
    starts_BT = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BT[:, :1], bool),
            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1],
        ],
        axis=1,
    )
    last_start_BT = jax.lax.cummax(jnp.where(starts_BT, idx_T, 0), axis=1)
    return idx_T - last_start_BT


class DecoderLayer(nnx.Module):
    """x + mixer(norm(x)), then h + ffn(norm(h)); mixer is Gated DeltaNet or gated attention."""

    def __init__(self, cfg: ModelConfig, layer_type: str, moe: bool, *, rngs: nnx.Rngs):
        self.layer_type = layer_type
        self.moe = moe
        pdt = cfg.param_dtype
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        if layer_type == LINEAR:
            self.mixer = GatedDeltaNet(cfg, rngs=rngs)
        else:
            self.mixer = GatedAttention(cfg, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        if moe:
            self.ffn = SparseMoE(cfg, rngs=rngs)
        else:
            self.ffn = SwiGLU(
                cfg.hidden_size,
                cfg.intermediate_size,
                std=cfg.initializer_range,
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=pdt,
                rngs=rngs,
            )

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, valid_BT):
        h_BTD = self.input_norm(x_BTD)
        if self.layer_type == LINEAR:
            h_BTD = self.mixer(h_BTD, segment_ids_BT)
        else:
            h_BTD = self.mixer(h_BTD, positions_BT, segment_ids_BT)
        x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)
        h_BTD = self.post_norm(x_BTD)
        stats = None
        if self.moe:
            h_BTD, stats = self.ffn(h_BTD, valid_BT)
        else:
            h_BTD = self.ffn(h_BTD)
        x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)
        return sharding.constrain(x_BTD, ("batch", "seq", "act_embed")), stats


class SuperBlock(nnx.Module):
    """One period of the layer pattern; returns stacked routing stats of its MoE layers."""

    def __init__(self, cfg: ModelConfig, kinds: tuple[tuple[str, bool], ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, t, m, rngs=rngs) for t, m in kinds])
        self.remat_policy = cfg.remat_policy

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, valid_BT):
        all_stats = []
        for layer in self.layers:
            if self.remat_policy == "none":
                x_BTD, stats = layer(x_BTD, positions_BT, segment_ids_BT, valid_BT)
            else:
                # Remat per layer, not per super-block: the backward then rebuilds one layer's
                # intermediates at a time (one MoE layer's dispatch buffers, not four) for the
                # price of saving each layer's input instead of each block's.
                graphdef, state = nnx.split(layer)

                def run(x, state, graphdef=graphdef):
                    return nnx.merge(graphdef, state)(x, positions_BT, segment_ids_BT, valid_BT)

                policy = _REMAT_POLICIES[self.remat_policy]
                x_BTD, stats = jax.checkpoint(run, policy=policy)(x_BTD, state)
            if stats is not None:
                all_stats.append(stats)
        stacked = jax.tree.map(lambda *s: jnp.stack(s), *all_stats) if all_stats else {}
        return x_BTD, stacked


def _stack_modules(make, n: int, rngs: nnx.Rngs):
    """n independently initialised copies of ``make(rngs)``, stacked on a leading 'layers' axis."""
    keys = jax.random.split(rngs.params(), n)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    state = jax.vmap(lambda k: nnx.state(make(nnx.Rngs(params=k))))(keys)
    module = nnx.merge(graphdef, state)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable):
            axes = var.get_metadata().get("axes")
            if axes is not None:
                var.set_metadata("axes", ("layers", *axes))
    return module


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class MTPHead(nnx.Module):
    """One multi-token-prediction depth (spec §2.6.2): fc([norm(embed(next)); norm(h)]) ->
    full-attention MoE decoder layer -> norm. The embedding and lm_head are the model's own."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, pdt = cfg.hidden_size, cfg.param_dtype
        self.dtype = jnp.dtype(cfg.dtype)
        self.pre_fc_norm_embedding = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.pre_fc_norm_hidden = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.fc_2DD = params.normal(rngs, (2 * D, D), (None, "embed"), cfg.initializer_range, pdt)
        self.layer = DecoderLayer(cfg, FULL, moe=True, rngs=rngs)
        self.norm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=pdt)

    def __call__(self, h_BTD, next_emb_BTD, positions_BT, segment_ids_BT, valid_BT):
        e_BTD = self.pre_fc_norm_embedding(next_emb_BTD)
        h_BTD = self.pre_fc_norm_hidden(h_BTD)
        z_BT2D = jnp.concatenate([e_BTD, h_BTD], axis=-1)  # embedding first, then hidden
        z_BTD = params.project(z_BT2D, self.fc_2DD, "btc,cd->btd", self.dtype)
        z_BTD, stats = self.layer(z_BTD, positions_BT, segment_ids_BT, valid_BT)
        return self.norm(z_BTD), stats


class Qwen3Next(nnx.Module):
    """The Qwen3-Next language model. See ModelOutput for what a call returns."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, V, pdt, std = cfg.hidden_size, cfg.vocab_size, cfg.param_dtype, cfg.initializer_range
        self.dtype = jnp.dtype(cfg.dtype)
        self.embed_VD = params.normal(rngs, (V, D), ("vocab", "embed"), std, pdt)
        kinds = tuple(
            (t, i not in cfg.mlp_only_layers) for i, t in enumerate(cfg.resolved_layer_types)
        )
        period = _period(kinds)
        self.block_kinds = kinds[:period]
        self.num_blocks = len(kinds) // period
        self.blocks = _stack_modules(
            lambda r: SuperBlock(cfg, self.block_kinds, rngs=r), self.num_blocks, rngs
        )
        self.final_norm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=pdt)
        if not cfg.tie_word_embeddings:
            self.lm_head_DV = params.normal(rngs, (D, V), ("embed", "vocab"), std, pdt)
        self.mtp = nnx.List([MTPHead(cfg, rngs=rngs) for _ in range(cfg.num_mtp_layers)])

    # --------------------------------------------------------------------------------- pieces
    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i as a standalone module (a copy of its slice of the stacked params)."""
        b, j = divmod(i, len(self.block_kinds))
        graphdef, state = nnx.split(self.blocks)
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[b], state))
        return block.layers[j]

    def embed(self, ids_BT: jax.Array) -> jax.Array:
        x_BTD = jnp.take(self.embed_VD[...], ids_BT, axis=0).astype(self.dtype)
        return sharding.constrain(x_BTD, ("batch", "seq", "act_embed"))

    def lm_head_weight(self) -> jax.Array:
        """[D, V] in the parameter dtype (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_VD[...].T
        return self.lm_head_DV[...]

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        w_DV = self.lm_head_weight().astype(self.dtype)
        out = einsum_f32("btd,dv->btv", h_BTD.astype(self.dtype), w_DV)
        return sharding.constrain(out, ("batch", "seq", "act_vocab"))

    def run_blocks(self, x_BTD, positions_BT, segment_ids_BT, valid_BT):
        """The decoder stack; returns (x, routing stats stacked over MoE layers)."""
        graphdef, state = nnx.split(self.blocks)

        def body(x, block_state):
            block = nnx.merge(graphdef, block_state)
            return block(x, positions_BT, segment_ids_BT, valid_BT)

        if self.cfg.scan_layers:
            x_BTD, stats = jax.lax.scan(body, x_BTD, state)
        else:
            per_block = []
            for i in range(self.num_blocks):
                x_BTD, s = body(x_BTD, jax.tree.map(lambda a, i=i: a[i], state))
                per_block.append(s)
            stats = jax.tree.map(lambda *s: jnp.stack(s), *per_block) if per_block else {}
        # [blocks, moe_per_block, ...] -> [moe_layers, ...] in layer order.
        stats = jax.tree.map(lambda a: a.reshape((-1, *a.shape[2:])), stats)
        return x_BTD, stats

    # ----------------------------------------------------------------------------------- call
    def __call__(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """input_ids [B,T] int. segment_ids [B,T] (0 = padding) packs documents; positions default
        to restarting per document (or 0..T-1 without segment_ids)."""
        B, T = input_ids.shape
        if positions is None:
            positions = (
                positions_from_segments(segment_ids)
                if segment_ids is not None
                else jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            )
        valid_BT = None if segment_ids is None else segment_ids != 0
        x_BTD = self.embed(input_ids)
        x_BTD, router = self.run_blocks(x_BTD, positions, segment_ids, valid_BT)
        h_BTD = self.final_norm(x_BTD)

        mtp_hidden = []
        h_prev = h_BTD
        for d, head in enumerate(self.mtp):
            # Depth d pairs hidden state t with the token at t+1+d (spec §2.6.2; chained as in
            # DeepSeek-V3). Rows past the end see token 0; their targets are masked by the loss.
            next_ids = jnp.pad(input_ids[:, d + 1 :], ((0, 0), (0, d + 1)))
            h_prev, stats = head(h_prev, self.embed(next_ids), positions, segment_ids, valid_BT)
            router = _append_layer_stats(router, stats)
            mtp_hidden.append(h_prev)
        mtp_h = jnp.stack(mtp_hidden) if mtp_hidden else None

        logits = mtp_logits = None
        if compute_logits:
            logits = self.logits(h_BTD)
            if mtp_h is not None:
                mtp_logits = jnp.stack([self.logits(h) for h in mtp_h])
        return ModelOutput(logits, mtp_logits, h_BTD, mtp_h, router)


def _append_layer_stats(stacked: dict, stats: dict) -> dict:
    if not stacked:
        return jax.tree.map(lambda b: b[None], stats)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), stacked, stats)


def _period(kinds: tuple) -> int:
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and kinds == kinds[:p] * (n // p):
            return p
    return n
