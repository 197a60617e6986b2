"""Causal depthwise 1-D convolution with document resets, for the Gated DeltaNet short conv."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_depthwise_conv(
    x_BTC: jax.Array,
    w_KC: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    state_BKmC: jax.Array | None = None,
) -> jax.Array:
    """y[t, c] = sum_j w[j, c] * x[t - (K-1) + j, c]; tap K-1 multiplies the current token.

    Inputs before t = 0 come from ``state_BKmC`` (the previous K-1 inputs, oldest first) or are
    zero. With ``segment_ids_BT``, an input only reaches outputs of its own document, so packed
    documents never see their neighbours (padding, id 0, contributes nothing either). Accumulates
    in float32 and returns x's dtype. No activation is applied here.
    """
    K = w_KC.shape[0]
    B, T, C = x_BTC.shape
    if state_BKmC is None:
        state_BKmC = jnp.zeros((B, K - 1, C), x_BTC.dtype)
    xp_BSC = jnp.concatenate([state_BKmC.astype(x_BTC.dtype), x_BTC], axis=1)
    if segment_ids_BT is not None:
        # The cached prefix belongs to the document of token 0.
        seg_BS = jnp.concatenate(
            [jnp.broadcast_to(segment_ids_BT[:, :1], (B, K - 1)), segment_ids_BT], axis=1
        )
    y_BTC = jnp.zeros((B, T, C), jnp.float32)
    for j in range(K):
        shift = K - 1 - j
        tap_BTC = xp_BSC[:, j : j + T].astype(jnp.float32)
        if segment_ids_BT is not None and shift:
            same_BT = (seg_BS[:, j : j + T] == segment_ids_BT) & (segment_ids_BT != 0)
            tap_BTC = jnp.where(same_BT[..., None], tap_BTC, 0.0)
        y_BTC = y_BTC + tap_BTC * w_KC[j].astype(jnp.float32)
    return y_BTC.astype(x_BTC.dtype)


def conv_state_after(x_BTC: jax.Array, kernel: int, state_BKmC: jax.Array | None = None):
    """The last K-1 inputs (oldest first) after consuming x: the decode-time conv cache."""
    B, _, C = x_BTC.shape
    if state_BKmC is None:
        state_BKmC = jnp.zeros((B, kernel - 1, C), x_BTC.dtype)
    return jnp.concatenate([state_BKmC.astype(x_BTC.dtype), x_BTC], axis=1)[:, -(kernel - 1) :]
