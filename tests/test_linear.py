"""Float32-result contractions with a 16-bit backward (ops/linear.py) and the 16-bit projection
(layers/params.project): values, gradients, and that no backward product runs in float32."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3next_jax.layers import params
from qwen3next_jax.ops.linear import einsum_f32


def _inputs(dtype):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (6, 16), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (16, 8), jnp.float32)
    g = jax.random.normal(kg, (6, 8), jnp.float32)
    return x, w, g


def _dot_input_dtypes(fn, *args):
    """Operand dtypes of every dot_general in fn's jaxpr (nested jaxprs included)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(v.aval.dtype for v in eqn.invars))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_float32_inputs_match_plain_autodiff_exactly():
    x, w, g = _inputs(jnp.float32)
    plain = lambda x, w: jnp.einsum("td,de->te", x, w, preferred_element_type=jnp.float32)
    y, vjp = jax.vjp(lambda x, w: einsum_f32("td,de->te", x, w), x, w)
    y_ref, vjp_ref = jax.vjp(plain, x, w)
    np.testing.assert_array_equal(y, y_ref)
    for a, b in zip(vjp(g), vjp_ref(g), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bf16_forward_is_float32_and_backward_uses_the_bf16_cotangent():
    x, w, g = _inputs(jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, w: einsum_f32("td,de->te", x, w), x, w)
    assert y.dtype == jnp.float32
    ref = jnp.einsum("td,de->te", x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(y, ref)
    dx, dw = vjp(g)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    # independent computation: products of the bf16-rounded cotangent, fp32 accumulation
    g16 = np.asarray(g.astype(jnp.bfloat16), np.float32)
    w16 = np.asarray(w.astype(jnp.bfloat16), np.float32)
    x32 = np.asarray(x, np.float32)
    np.testing.assert_allclose(np.asarray(dx, np.float32), g16 @ w16.T, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dw), x32.T @ g16, rtol=1e-2, atol=1e-2)


def test_no_float32_products_in_the_bf16_backward():
    x, w, _ = _inputs(jnp.bfloat16)
    w_param = nnx.Param(w)

    def loss(x, w):
        logits = einsum_f32("td,de->te", x, w)
        h = params.project(x, nnx.Param(w), "td,de->te", jnp.bfloat16)
        return jnp.sum(jax.nn.log_softmax(logits)) + jnp.sum(h.astype(jnp.float32) ** 2)

    dtypes = _dot_input_dtypes(jax.grad(loss, (0, 1)), x, w_param[...])
    assert len(dtypes) >= 6  # two forward products, four backward ones
    assert all(d == (jnp.bfloat16, jnp.bfloat16) for d in dtypes), dtypes


def test_project_result_is_in_the_compute_dtype():
    x, w, _ = _inputs(jnp.float32)
    h = params.project(x, nnx.Param(w), "td,de->te", jnp.bfloat16)
    assert h.dtype == jnp.bfloat16
    ref = np.asarray(x.astype(jnp.bfloat16), np.float32) @ np.asarray(
        w.astype(jnp.bfloat16), np.float32
    )
    np.testing.assert_allclose(np.asarray(h, np.float32), ref, rtol=1e-2, atol=1e-2)
