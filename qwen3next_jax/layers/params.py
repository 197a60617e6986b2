"""Parameter constructors that record logical axis names, and the dtype-aware projection."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def normal(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], std: float, dtype):
    """A Param drawn from N(0, std²), annotated with logical ``axes``."""
    value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value.astype(dtype), axes=tuple(axes))


def constant(shape: Sequence[int], axes: Sequence[str | None], value: float, dtype):
    return nnx.Param(jnp.full(tuple(shape), value, dtype), axes=tuple(axes))


def project(x: jax.Array, w: nnx.Param, spec: str, dtype) -> jax.Array:
    """einsum(spec, x, w) in the compute ``dtype``, result in ``dtype``.

    The product's own result dtype is ``dtype`` (GPU and TPU still accumulate in float32): a
    float32 result cast down afterwards would make autodiff multiply a float32 cotangent with
    the 16-bit operands, which XLA runs as float32 products (ops/linear.py).
    """
    return jnp.einsum(spec, x.astype(dtype), w[...].astype(dtype), preferred_element_type=dtype)
