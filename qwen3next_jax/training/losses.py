"""Training losses: next-token CE (from logits, or over token chunks from the hidden states), MTP
CE, MoE load balancing, router z-loss.

Normalisation and gradient accumulation. Every loss here is a ratio sum / count. With one
micro-batch the counts are the batch's own. When a global batch is split into M micro-batches,
the caller passes the GLOBAL denominators (num_tokens_global, mtp_tokens_global, global_tokens_L,
and the global expert counts global_counts_LE); every term is then linear in the micro-batch's
sums, so the SUM over micro-batches of ``loss_fn``'s loss (and of its gradients) equals the loss
(and gradient) of the whole batch exactly. Sum the micro-batch gradients; do not average them.
The global denominators are cheap to get beforehand for CE (they come from the masks), but the
expert counts come from a forward pass: the caller either runs the routers first or accepts
per-micro-batch counts (then f is local, as in Megatron's non-global aux loss).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32
LOSS_DEFAULTS: dict[str, Any] = {
    "mtp_weight": 0.1,
    "lb_coef": 1e-3,
    "z_coef": 0.0,
    "ce_chunk_tokens": 0,
}


def _cfg(cfg, name: str):
    return getattr(cfg, name, LOSS_DEFAULTS[name])


# ------------------------------------------------------------------------------- cross entropy
def _lse_and_nll_sum(logits_NV, targets_N, mask_N) -> tuple[jax.Array, jax.Array]:
    """(logsumexp(logits) [N], Σ mask·(logsumexp(logits) - logits[target])), in float32."""
    logits_NV = logits_NV.astype(jnp.float32)
    lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
    tgt_N = jnp.take_along_axis(logits_NV, targets_N[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse_N, jnp.sum(jnp.where(mask_N, lse_N - tgt_N, 0.0))


def _nll_sum(logits_NV: jax.Array, targets_N: jax.Array, mask_N: jax.Array) -> jax.Array:
    """Σ mask·(logsumexp(logits) - logits[target]) in float32."""
    return _lse_and_nll_sum(logits_NV, targets_N, mask_N)[1]


def cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(Σ masked token NLL, number of masked-in tokens), both float32; log-softmax in float32."""
    mask_BT = mask_BT != 0
    return _nll_sum(logits_BTV, targets_BT, mask_BT), jnp.sum(mask_BT, dtype=jnp.float32)


def chunked_cross_entropy(
    h_BTD: jax.Array,
    w_DV: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    chunk_tokens: int,
    dtype=jnp.bfloat16,
) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy(h @ w, ...)`` without ever holding the full [B,T,V] logits.

    The sequence is cut into chunks of c = max(1, chunk_tokens // B) positions (so a chunk holds
    about chunk_tokens tokens of the batch given, all rows at once: the batch axis, the one that is
    data-sharded, is never the scanned one). A lax.scan runs one chunk at a time: logits in float32
    from ``dtype`` operands (as Qwen3Next.logits), then the float32 NLL sum.

    Differentiated, the forward scan also forms each chunk's logit gradient softmax - onehot
    (masked, cast to ``dtype``) and its two products, dh in ``dtype`` and dW accumulated over
    chunks in float32; the backward only scales them by the loss's cotangent. So the logits are
    computed once (a recomputing backward computes them twice: one LM-head product in four) and
    nothing of size [T, V] outlives its chunk. The gradients match plain autodiff of
    ``cross_entropy`` with ``dtype`` operands (tests/test_losses.py).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive.")
    B, T, D = h_BTD.shape
    c = max(1, min(T, chunk_tokens // B))
    n = -(-T // c)
    pad = n * c - T
    mask_BT = mask_BT != 0
    if pad:
        h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
    # [B, n*c, ...] -> [n, B, c, ...]: the scanned chunk axis leads.
    h_nBcD = h_BTD.astype(dtype).reshape(B, n, c, D).swapaxes(0, 1)
    tgt_nBc = targets_BT.astype(jnp.int32).reshape(B, n, c).swapaxes(0, 1)
    mask_nBc = mask_BT.reshape(B, n, c).swapaxes(0, 1)
    loss_sum = _chunked_nll(h_nBcD, w_DV, tgt_nBc, mask_nBc)
    return loss_sum, jnp.sum(mask_BT, dtype=jnp.float32)


def _chunk_logits(h_BcD, w_DV):
    return jnp.einsum("bcd,dv->bcv", h_BcD, w_DV.astype(h_BcD.dtype), preferred_element_type=F32)


@jax.custom_vjp
def _chunked_nll(h_nBcD, w_DV, tgt_nBc, mask_nBc):
    """Σ over chunks of _nll_sum(h_chunk @ w, ...); h in the compute dtype, w in its own."""
    w_c = w_DV.astype(h_nBcD.dtype)

    def body(acc, xs):
        h_BcD, tgt_Bc, mask_Bc = xs
        return acc + _nll_sum(_chunk_logits(h_BcD, w_c), tgt_Bc, mask_Bc), None

    loss, _ = jax.lax.scan(body, jnp.zeros((), F32), (h_nBcD, tgt_nBc, mask_nBc))
    return loss


def _chunked_nll_fwd(h_nBcD, w_DV, tgt_nBc, mask_nBc):
    w_c = w_DV.astype(h_nBcD.dtype)

    def body(carry, xs):
        acc, dw_DV = carry
        h_BcD, tgt_Bc, mask_Bc = xs
        logits_BcV = _chunk_logits(h_BcD, w_c)
        lse_Bc, nll = _lse_and_nll_sum(logits_BcV, tgt_Bc, mask_Bc)
        acc = acc + nll
        p_BcV = jnp.exp(logits_BcV - lse_Bc[..., None])
        hit_BcV = jax.lax.broadcasted_iota(jnp.int32, p_BcV.shape, 2) == tgt_Bc[..., None]
        d_BcV = jnp.where(mask_Bc[..., None], p_BcV - hit_BcV, 0.0).astype(w_c.dtype)
        dh_BcD = jnp.einsum("bcv,dv->bcd", d_BcV, w_c, preferred_element_type=w_c.dtype)
        dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", h_BcD, d_BcV, preferred_element_type=F32)
        return (acc, dw_DV), dh_BcD

    init = (jnp.zeros((), F32), jnp.zeros(w_DV.shape, F32))
    (loss, dw_DV), dh_nBcD = jax.lax.scan(body, init, (h_nBcD, tgt_nBc, mask_nBc))
    return loss, (dh_nBcD.astype(h_nBcD.dtype), dw_DV.astype(w_DV.dtype))


def _chunked_nll_bwd(res, g):
    dh_nBcD, dw_DV = res
    # Integer targets and the boolean mask take no cotangent (None = zero).
    return (g * dh_nBcD).astype(dh_nBcD.dtype), (g * dw_DV).astype(dw_DV.dtype), None, None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


# ----------------------------------------------------------------------------------------- MTP
def mtp_targets(
    targets_BT: jax.Array, loss_mask_BT: jax.Array, segment_ids_BT: jax.Array, depth: int
) -> tuple[jax.Array, jax.Array]:
    """Targets and mask of MTP depth ``depth`` (0-based): position t predicts token t+2+depth.

    tgt[t] = targets[t+1+depth]; valid iff t+1+depth < T, loss_mask[t+1+depth] == 1 and
    segment_ids[t] == segment_ids[t+1+depth] != 0, so no target crosses a document boundary
    (segment ids only grow along a row, so equal endpoints mean one document in between).
    Invalid positions get target 0 and mask 0; the mask has loss_mask's dtype.
    """
    B, T = targets_BT.shape
    s = depth + 1
    if s >= T:
        return jnp.zeros_like(targets_BT), jnp.zeros_like(loss_mask_BT)

    def shift(x_BT):  # x[t + s], zero past the end
        return jnp.pad(x_BT[:, s:], ((0, 0), (0, s)))

    seg_next_BT = shift(segment_ids_BT)
    valid_BT = (shift(loss_mask_BT) != 0) & (segment_ids_BT == seg_next_BT) & (segment_ids_BT != 0)
    tgt_BT = jnp.where(valid_BT, shift(targets_BT), 0).astype(targets_BT.dtype)
    return tgt_BT, valid_BT.astype(loss_mask_BT.dtype)


# ------------------------------------------------------------------------------- router losses
def load_balancing_loss(
    router: dict,
    num_experts: int,
    top_k: int,
    *,
    global_counts_LE: jax.Array | None = None,
    global_tokens_L: jax.Array | None = None,
) -> jax.Array:
    """Σ_l E·Σ_e f_le·P_le (spec §3.2, Megatron convention: uniform routing gives 1 per layer).

    f_le = counts_le / (k·N_l), the fraction of routed slots (no gradient); P_le =
    prob_sum_le / N_l, the mean router probability (differentiable). Layers (main stack, then MTP)
    are summed.

    Global-batch form: with global_counts_LE and global_tokens_L (the sums of counts_E and
    num_tokens over every micro-batch of the global batch), f_le = global_counts_le /
    (k·N_global_l) and P_le = prob_sum_le / N_global_l, so the loss is linear in this
    micro-batch's prob_sum and its sum over micro-batches is the full-batch loss.
    """
    if not router:
        return jnp.zeros((), jnp.float32)
    if (global_counts_LE is None) != (global_tokens_L is None):
        raise ValueError("Pass global_counts_LE and global_tokens_L together, or neither.")
    if global_counts_LE is None:
        counts_LE, tokens_L = router["counts_E"], router["num_tokens"]
    else:
        counts_LE, tokens_L = global_counts_LE, global_tokens_L
    n_L1 = jnp.maximum(jnp.asarray(tokens_L, jnp.float32), 1.0)[:, None]
    f_LE = jax.lax.stop_gradient(jnp.asarray(counts_LE, jnp.float32)) / (top_k * n_L1)
    P_LE = router["prob_sum_E"].astype(jnp.float32) / n_L1
    return num_experts * jnp.sum(f_LE * P_LE)


def z_loss(router: dict, *, global_tokens_L: jax.Array | None = None) -> jax.Array:
    """Router z-loss: the mean over MoE layers of the per-layer token mean of logsumexp(logits)².

    = (1/L)·Σ_l z_sum_l / N_l, with N_l = global_tokens_L[l] when given (micro-batch form: the sum
    over micro-batches is then the full-batch value).
    """
    if not router:
        return jnp.zeros((), jnp.float32)
    tokens_L = router["num_tokens"] if global_tokens_L is None else global_tokens_L
    n_L = jnp.maximum(jnp.asarray(tokens_L, jnp.float32), 1.0)
    return jnp.mean(router["z_sum"].astype(jnp.float32) / n_L)


def router_metrics(router: dict, num_experts: int, top_k: int) -> dict[str, jax.Array]:
    """Monitoring numbers (no gradient), over all MoE layers.

    expert_load_max / expert_load_min: the largest / smallest per-layer expert load relative to
    uniform, counts_le·E / (k·N_l) (1 = perfectly balanced); router_entropy: mean routing entropy
    per token (nats); dropped_fraction: mean over layers of the fraction of routed slots dropped.
    """
    if not router:
        return {}
    router = jax.lax.stop_gradient(router)
    n_L = jnp.maximum(router["num_tokens"].astype(jnp.float32), 1.0)
    load_LE = router["counts_E"] * num_experts / (top_k * n_L[:, None])
    return {
        "expert_load_max": jnp.max(load_LE),
        "expert_load_min": jnp.min(load_LE),
        "router_entropy": jnp.sum(router["entropy_sum"]) / jnp.sum(n_L),
        "dropped_fraction": jnp.mean(router["dropped_fraction"]),
    }


# -------------------------------------------------------------------------------------- total
def loss_fn(
    model,
    batch: dict,
    cfg,
    *,
    global_counts_LE: jax.Array | None = None,
    global_tokens_L: jax.Array | None = None,
    num_tokens_global: jax.Array | None = None,
    mtp_tokens_global: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """(loss, aux) for one (micro-)batch.

    loss = ce + mtp_weight·mean_d(mtp_ce_d) + lb_coef·lb + z_coef·z, with ce = ce_sum / count
    (count = num_tokens_global when given, else this batch's masked-in tokens), mtp_ce_d likewise
    with mtp_tokens_global[d] (scalar or [Dm]), and lb, z as load_balancing_loss / z_loss with the
    global routing numbers when given. With all four global arguments the sum over micro-batches
    of ``loss`` is the full-batch loss (module docstring).

    cfg (attribute access): mtp_weight (0.1), lb_coef (1e-3), z_coef (0.0), ce_chunk_tokens (0 =
    full logits; > 0 = chunked_cross_entropy on the hidden states, in the model's compute dtype).

    aux: loss, ce, mtp_loss, mtp_loss_per_depth [Dm], lb_loss, z_loss, num_tokens, and the raw
    sums for exact accumulation: ce_sum, ce_count, mtp_sum [Dm], mtp_count [Dm]; plus
    router_metrics.
    """
    mcfg = model.cfg
    chunk = int(_cfg(cfg, "ce_chunk_tokens") or 0)
    targets, loss_mask, seg = batch["targets"], batch["loss_mask"], batch["segment_ids"]
    out = model(batch["inputs"], seg, batch["positions"], compute_logits=chunk <= 0)

    if chunk > 0:
        w_DV, dtype = model.lm_head_weight(), jnp.dtype(mcfg.dtype)

        def ce(h_BTD, logits_BTV, tgt, mask):
            del logits_BTV
            return chunked_cross_entropy(h_BTD, w_DV, tgt, mask, chunk_tokens=chunk, dtype=dtype)
    else:

        def ce(h_BTD, logits_BTV, tgt, mask):
            del h_BTD
            return cross_entropy(logits_BTV, tgt, mask)

    ce_sum, ce_count = ce(out.hidden, out.logits, targets, loss_mask)
    # max(., 1): an all-masked batch gives 0, not 0/0.
    ce_den = ce_count if num_tokens_global is None else jnp.asarray(num_tokens_global, jnp.float32)
    ce_loss = ce_sum / jnp.maximum(ce_den, 1.0)

    num_depths = 0 if out.mtp_hidden is None else out.mtp_hidden.shape[0]
    mtp_sums, mtp_counts = [], []
    for d in range(num_depths):
        tgt_d, mask_d = mtp_targets(targets, loss_mask, seg, d)
        logits_d = None if out.mtp_logits is None else out.mtp_logits[d]
        s, c = ce(out.mtp_hidden[d], logits_d, tgt_d, mask_d)
        mtp_sums.append(s)
        mtp_counts.append(c)
    mtp_sum_D = jnp.stack(mtp_sums) if mtp_sums else jnp.zeros((0,), jnp.float32)
    mtp_count_D = jnp.stack(mtp_counts) if mtp_counts else jnp.zeros((0,), jnp.float32)
    if mtp_tokens_global is None:
        mtp_den_D = mtp_count_D
    else:
        mtp_den_D = jnp.broadcast_to(jnp.asarray(mtp_tokens_global, jnp.float32), (num_depths,))
    mtp_per_depth_D = mtp_sum_D / jnp.maximum(mtp_den_D, 1.0)
    mtp_loss = jnp.mean(mtp_per_depth_D) if num_depths else jnp.zeros((), jnp.float32)

    E, k = mcfg.num_experts, mcfg.num_experts_per_tok
    lb = load_balancing_loss(
        out.router, E, k, global_counts_LE=global_counts_LE, global_tokens_L=global_tokens_L
    )
    z = z_loss(out.router, global_tokens_L=global_tokens_L)

    total = (
        ce_loss
        + _cfg(cfg, "mtp_weight") * mtp_loss
        + _cfg(cfg, "lb_coef") * lb
        + _cfg(cfg, "z_coef") * z
    )
    aux = {
        "loss": total,
        "ce": ce_loss,
        "mtp_loss": mtp_loss,
        "mtp_loss_per_depth": mtp_per_depth_D,
        "lb_loss": lb,
        "z_loss": z,
        "num_tokens": ce_count,
        "ce_sum": ce_sum,
        "ce_count": ce_count,
        "mtp_sum": mtp_sum_D,
        "mtp_count": mtp_count_D,
        **router_metrics(out.router, E, k),
    }
    return total, jax.lax.stop_gradient(aux)
