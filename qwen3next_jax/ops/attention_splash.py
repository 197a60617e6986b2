"""Causal GQA attention with packed-document masking through the Pallas TPU splash kernel.

`jax.experimental.pallas.ops.tpu.splash_attention` computes one batch row in [heads, T, H]
layout with a static (here causal) block-sparse mask, runtime segment ids, float32 softmax
statistics and its own custom VJP. Its multi-head form accepts K kv heads for N = K * G query
heads (query head n reads kv head n // G) and reduces dk, dv over each group inside the
backward kernel, so k and v are never repeated. It does not scale q: we scale first.

Segment ids: splash lets a query read a key iff their ids are equal (and causality holds), which
is exactly the XLA reference's rule, padding (id 0) included: padding rows read earlier padding
rows, never a document, and always at least themselves, so they stay finite.

Sharding: a Pallas TPU kernel cannot be partitioned by GSPMD, so under an active
`sharding.use_mesh` the kernel runs inside `jax.shard_map`: batch split like the logical axis
'batch', query heads like 'act_heads', the sequence and the kv heads whole on every shard (the
kernel has no sequence parallelism; kv heads are few). A shard holding query heads
[i*n, (i+1)*n) slices out the kv heads those read, by `axis_index`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen3next_jax import sharding

MAX_BLOCK = 512  # q and kv tile length where T allows
MIN_BLOCK = 128  # the TPU lane width: T must be a multiple of it


def supports(q_BTNH: jax.Array, k_BSKH: jax.Array) -> bool:
    """Whether splash can run these shapes: self-attention with T a multiple of MIN_BLOCK, and
    under an active mesh a batch and head count that its batch and head shards divide."""
    B, T, N, _ = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if not (T == S and T % MIN_BLOCK == 0 and N % K == 0):
        return False
    ctx = sharding.current()
    if ctx is None:
        return True
    spec = sharding.logical_to_spec(("batch", None, "act_heads", None), ctx.rules, ctx.mesh)
    b_shards, n_shards = (_shards(ctx.mesh, spec[i]) for i in (0, 2))
    return B % b_shards == 0 and N % n_shards == 0


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _shards(mesh, entry) -> int:
    return math.prod(mesh.shape[a] for a in _axes(entry))


def block_size(T: int, max_block: int = MAX_BLOCK) -> int:
    """The largest power of two <= max_block dividing T, at least MIN_BLOCK."""
    b = max_block
    while b > MIN_BLOCK and T % b:
        b //= 2
    return b


def _kernel(num_heads: int, T: int, block: int, interpret: bool):
    """A splash kernel for [num_heads, T, H] queries under a causal mask. Built per trace: its
    block tables become jnp arrays (tracers under jit), while the numpy mask analysis behind
    them is cached by splash itself."""
    mask = splash.MultiHeadMask([splash.CausalMask((T, T)) for _ in range(num_heads)])
    blocks = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mha(
        mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _local_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, block, interpret):
    """splash on arrays held whole by this device; N a multiple of K."""
    B, T, N, H = q_BTNH.shape
    kernel = _kernel(N, T, block, interpret)
    # Scale in fp32 before the cast back: splash computes q kᵀ without any scale.
    q_BNTH = (q_BTNH.astype(jnp.float32) * H**-0.5).astype(q_BTNH.dtype).transpose(0, 2, 1, 3)
    k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
    v_BKSH = v_BSKH.transpose(0, 2, 1, 3)
    if segment_ids_BT is None:
        out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
    else:
        seg = segment_ids_BT.astype(jnp.int32)
        out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, splash.SegmentIds(q=seg, kv=seg))
    return out_BNTH.transpose(0, 2, 1, 3).astype(q_BTNH.dtype)


def _kv_for_local_heads(k_BSKH, heads_total: int, head_axes: tuple[str, ...], shards: int):
    """The kv heads [B, S, K_local, H] read by this shard's query heads [i*n, (i+1)*n), i its
    index over head_axes (of `shards` shards in all); n is a multiple of K_local."""
    K = k_BSKH.shape[2]
    if shards == 1:
        return k_BSKH
    n, group = heads_total // shards, heads_total // K
    i = jax.lax.axis_index(head_axes)
    if n % group == 0 or group % n == 0:
        # Whole groups per shard, or the shard inside one group: a contiguous kv slice.
        k_local = max(1, n // group)
        return jax.lax.dynamic_slice_in_dim(k_BSKH, i * n // group, k_local, axis=2)
    # Groups straddle shards: one kv head per local query head (copies n kv heads).
    kv_of_head_n = (i * n + jnp.arange(n)) // group
    return jnp.take(k_BSKH, kv_of_head_n, axis=2)


def splash_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    interpret: bool = False,
    max_block: int = MAX_BLOCK,
) -> jax.Array:
    """softmax(q kᵀ / sqrt(H)) v over causal, same-segment keys; returns [B, T, N, H] q's dtype.

    q [B, T, N, H], k and v [B, T, K, H] with N a multiple of K (query head n reads kv head
    n // (N // K)), bf16 or fp32; segment_ids_BT int [B, T] or None. T must be a multiple of
    128. Softmax statistics are float32. ``interpret`` runs the kernel in Pallas interpret mode
    (any platform). Under `sharding.use_mesh` the kernel runs in shard_map (module docstring).
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if S != T:
        raise ValueError(f"splash attention needs self-attention; got {T} queries and {S} keys.")
    if T % MIN_BLOCK:
        raise ValueError(
            f"splash attention needs the sequence length to be a multiple of {MIN_BLOCK}; got {T}."
        )
    if N % K:
        raise ValueError(f"splash attention: {N} query heads are not a multiple of {K} kv heads.")
    block = block_size(T, max_block)
    local = functools.partial(_local_attention, block=block, interpret=interpret)

    ctx = sharding.current()
    if ctx is None:
        return local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)

    q_spec = sharding.logical_to_spec(("batch", None, "act_heads", None), ctx.rules, ctx.mesh)
    batch_axes, head_axes = q_spec[0], q_spec[2]
    kv_spec = P(batch_axes, None, None, None)
    seg_spec = P(batch_axes, None)
    head_axes = _axes(head_axes)
    head_shards = _shards(ctx.mesh, head_axes)

    def body(q, k, v, *seg):
        k = _kv_for_local_heads(k, N, head_axes, head_shards)
        v = _kv_for_local_heads(v, N, head_axes, head_shards)
        return local(q, k, v, seg[0] if seg else None)

    args = (q_BTNH, k_BSKH, v_BSKH)
    specs = (q_spec, kv_spec, kv_spec)
    if segment_ids_BT is not None:
        args, specs = (*args, segment_ids_BT), (*specs, seg_spec)
    if any(t == jax.sharding.AxisType.Explicit for t in ctx.mesh.axis_types):
        # Explicit axes: shard_map wants its inputs laid out as in_specs already.
        args = tuple(
            jax.sharding.reshard(a, NamedSharding(ctx.mesh, s))
            for a, s in zip(args, specs, strict=True)
        )
    # check_vma=False: pallas_call's outputs carry no varying-axes annotation.
    fn = jax.shard_map(body, mesh=ctx.mesh, in_specs=specs, out_specs=q_spec, check_vma=False)
    return fn(*args)
