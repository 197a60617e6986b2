"""Decode-time caches: per-layer Gated DeltaNet state and preallocated attention KV caches.

Layout follows the parameters: ``Caches.layers[j]`` is the cache of layer j of the super-block,
with a leading ``[num_blocks]`` axis on every leaf, so decoding ``lax.scan``s over blocks exactly
as training does. A Gated DeltaNet layer keeps ``DeltaNetCache`` (the last conv_kernel-1 pre-conv
inputs per part and the float32 recurrent state [B,HV,Dk,Dv]); its size is independent of the
sequence length. An attention layer keeps a ``KVCache`` [B, S_max, K, H] (post-norm, post-RoPE
keys) in the compute dtype. MTP depths get their own ``KVCache`` each (no blocks axis).

Prompts are stored left-aligned: row b's real tokens occupy slots [start[b], length[b]); slots
before ``start`` are padding and are masked by every attention read. All rows share the slot
geometry but not their lengths (speculative decoding accepts a different number per row).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from flax import struct

from qwen3next_jax.layers.deltanet import DeltaNetCache


@struct.dataclass
class KVCache:
    k: jax.Array  # [(num_blocks,) B, S_max, K, H]
    v: jax.Array  # [(num_blocks,) B, S_max, K, H]


@struct.dataclass
class Caches:
    """Everything decoding carries between steps."""

    layers: tuple  # per super-block position: DeltaNetCache | KVCache, leading [num_blocks]
    mtp: tuple  # one KVCache [B, S_max, K, H] per MTP depth used for drafting
    start: jax.Array  # [B] int32, first real slot of each row
    length: jax.Array  # [B] int32, slots consumed by the main stack (and by MTP depth 0)

    @property
    def max_len(self) -> int:
        for c in self.layers:
            if isinstance(c, KVCache):
                return int(c.k.shape[2])
        for c in self.mtp:
            return int(c.k.shape[1])
        return -1  # a pure-GDN stack has no length limit


class GDNPending(NamedTuple):
    """What a multi-token cached forward keeps per GDN layer so any prefix can be committed.

    xp_*: the conv window before the step followed by the T new pre-conv inputs [B, Kc-1+T, C];
    states: the recurrent state after every new token [B, T, HV, Dk, Dv] float32.
    """

    xp_q: jax.Array
    xp_k: jax.Array
    xp_v: jax.Array
    states: jax.Array


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def gdn_cache_nbytes(caches: Caches) -> int:
    """Bytes held by the Gated DeltaNet layers (conv windows + recurrent states)."""
    return _nbytes([c for c in caches.layers if isinstance(c, DeltaNetCache)])


def kv_cache_nbytes(caches: Caches) -> int:
    """Bytes held by the attention KV caches (main stack and MTP)."""
    return _nbytes([c for c in caches.layers if isinstance(c, KVCache)]) + _nbytes(caches.mtp)


def cache_nbytes(caches: Caches) -> int:
    return _nbytes(caches)
