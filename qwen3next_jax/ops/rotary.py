"""Partial rotary position embedding (NeoX rotate-half convention on the first dims of a head)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_cos_sin(positions_BT: jax.Array, rotary_dim: int, theta: float):
    """cos, sin [B, T, rotary_dim] float32 for integer positions [B, T]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    emb_BTR = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
    return jnp.cos(emb_BTR), jnp.sin(emb_BTR)


def apply_partial_rotary(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """Rotates dims [0, R) of every head (pairs d, d + R/2); dims [R, H) pass through unchanged.

    Computed in float32 and cast back to x's dtype.
    """
    rot = cos_BTR.shape[-1]
    x_rot = x_BTNH[..., :rot].astype(jnp.float32)
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    out = (x_rot * cos + rotated * sin).astype(x_BTNH.dtype)
    return jnp.concatenate([out, x_BTNH[..., rot:]], axis=-1)
