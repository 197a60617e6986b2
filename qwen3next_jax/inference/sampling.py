"""Token sampling: greedy, temperature and nucleus (top-p) filtering."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filtered_logits(logits, temperature: float, top_p: float):
    """logits / temperature with tokens outside the top-p nucleus set to -inf (float32).

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p; the
    most likely token is always kept.
    """
    x = logits.astype(jnp.float32) / temperature
    if top_p >= 1.0:
        return x
    sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep_sorted = before < top_p
    n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_x, n_keep - 1, axis=-1)
    return jnp.where(x >= threshold, x, -jnp.inf)


def probs(logits, temperature: float, top_p: float):
    """The sampling distribution (float32) of ``sample`` for temperature > 0."""
    return jax.nn.softmax(filtered_logits(logits, temperature, top_p), axis=-1)


def sample(key, logits, temperature: float, top_p: float):
    """Token ids [...] int32: argmax when temperature == 0, else a draw from ``probs``."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, temperature, top_p)).astype(
        jnp.int32
    )
