"""Causal grouped-query attention with packed-document masking; one seam, several backends.

Backends: 'xla' (reference, any platform), 'cudnn' (flash attention through
``jax.nn.dot_product_attention``, GPU only), 'splash' (the Pallas TPU splash kernel,
ops/attention_splash.py; self-attention with T a multiple of 128), 'splash_interpret' (the same
kernel in Pallas interpret mode, any platform: tests), 'auto' (splash on TPU, cudnn on GPU, xla
on CPU, for the platform `sharding.target_platform()` names; on TPU, shapes splash cannot run,
such as a prompt of arbitrary length, fall back to xla).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from qwen3next_jax import sharding
from qwen3next_jax.ops import attention_splash

BACKENDS = ("auto", "xla", "cudnn", "splash", "splash_interpret")


def resolve_backend(backend: str) -> str:
    """The concrete backend for ``backend``; 'auto' follows `sharding.target_platform()`."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; expected one of {BACKENDS}.")
    if backend == "auto":
        return {"tpu": "splash", "gpu": "cudnn"}.get(sharding.target_platform(), "xla")
    return backend


def causal_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    backend: str = "auto",
) -> jax.Array:
    """softmax(q kᵀ / sqrt(H)) v over causal, same-document keys; returns [B, T, N, H] q's dtype.

    Query head n reads kv head n // (N // K). Softmax statistics are float32. With
    ``segment_ids_BT`` a token attends only to earlier tokens of its own document; padding rows
    (id 0) attend to themselves only, so they stay finite.
    """
    auto = backend == "auto"
    backend = resolve_backend(backend)
    if backend in ("splash", "splash_interpret"):
        if auto and not attention_splash.supports(q_BTNH, k_BSKH):
            _warn_fallback(q_BTNH.shape, k_BSKH.shape)
        else:
            return attention_splash.splash_attention(
                q_BTNH,
                k_BSKH,
                v_BSKH,
                segment_ids_BT=segment_ids_BT,
                interpret=backend == "splash_interpret",
            )
        backend = "xla"
    mask = None
    if segment_ids_BT is not None:
        same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        mask = same_BTS[:, None]
    if backend == "cudnn":
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=True, implementation="cudnn"
        )
    return _xla_attention(q_BTNH, k_BSKH, v_BSKH, mask)


_FALLBACKS_SEEN: set[tuple] = set()


def _warn_fallback(q_shape, k_shape) -> None:
    """Once per shape: on TPU a training-length sequence on XLA attention is a large slowdown."""
    key = (tuple(q_shape), tuple(k_shape))
    if key not in _FALLBACKS_SEEN:
        _FALLBACKS_SEEN.add(key)
        logging.warning(
            "attention: splash cannot take q %s / k %s on this mesh (needs self-attention, T a "
            "multiple of 128, batch and heads divisible by their shards); using XLA attention.",
            q_shape,
            k_shape,
        )


def _xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS):
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    allowed = jnp.tril(jnp.ones((T, S), bool), k=S - T)[None]
    if mask_B1TS is not None:
        allowed = allowed & mask_B1TS[:, 0]
    return masked_attention(q_BTNH, k_BSKH, v_BSKH, allowed)


def masked_attention(q_BTNH, k_BSKH, v_BSKH, allowed_BTS: jax.Array) -> jax.Array:
    """GQA softmax attention where query t of row b reads key s iff allowed[b, t, s].

    The reference path: float32 logits and softmax, output in q's dtype. ``allowed_BTS`` may have
    a leading 1 to broadcast over the batch.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum(
        "btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
    ) * (H**-0.5)
    logits_BKGTS = jnp.where(allowed_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
    out_BTKGH = jnp.einsum(
        "bkgts,bskh->btkgh",
        probs_BKGTS.astype(v_BSKH.dtype),
        v_BSKH,
        preferred_element_type=jnp.float32,
    )
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
