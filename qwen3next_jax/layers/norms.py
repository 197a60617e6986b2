"""Zero-centred RMSNorm (every norm but one) and the gated RMSNorm of the Gated DeltaNet output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax.layers import params


class RMSNorm(nnx.Module):
    """y = x / rms(x) * (1 + w), statistics and product in float32, cast back to x's dtype.

    w starts at zero so the gain starts at one; decaying w pulls the gain toward one.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.eps = eps
        self.weight = params.constant((dim,), ("norm",), 0.0, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """y = x / rms(x) * w * silu(z) per head (norm before gate); plain gain w, init one."""

    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.eps = eps
        self.weight = params.constant((dim,), ("norm",), 1.0, param_dtype)

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = y * self.weight[...].astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        return y.astype(x.dtype)
