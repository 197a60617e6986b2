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
    """einsum(spec, x, w) in the compute ``dtype``, float32 accumulation, result in ``dtype``."""
    return jnp.einsum(
        spec, x.astype(dtype), w[...].astype(dtype), preferred_element_type=jnp.float32
    ).astype(dtype)
