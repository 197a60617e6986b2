"""Contractions with a float32 result and a 16-bit backward.

`einsum_f32(spec, x, w)` is `jnp.einsum(spec, x, w, preferred_element_type=float32)` for the
projections whose result must be float32 (router logits, LM-head logits, gate pre-activations).
Plain autodiff of that einsum multiplies the float32 cotangent with the 16-bit operands, and XLA
runs those two products in float32: on an H200 the MoE router's backward took 2.2 ms at 32K
tokens for 68 GFLOP (bench/RESULTS.md). Here the backward first casts the cotangent to the
operands' dtype, so both products are 16-bit with float32 accumulation -- what a layer with a
16-bit result would do. With float32 operands nothing changes.
"""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w) as float32, operands cast to x's dtype (fp32 accumulation)."""
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _fwd(spec, x, w):
    return einsum_f32(spec, x, w), (x, w)


def _bwd(spec, res, g):
    x, w = res
    _, vjp = jax.vjp(
        lambda x, w: jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=x.dtype), x, w
    )
    return vjp(g.astype(x.dtype))


einsum_f32.defvjp(_fwd, _bwd)
