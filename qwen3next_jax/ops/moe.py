"""Sparse MoE ops: router top-k, load-balancing terms, and routed SwiGLU experts (sort-based,
dropless by default, optionally expert-parallel over a mesh axis).

Routed experts, single device: flatten the (token, slot) pairs, stable-sort them by expert, lay
the groups out for the grouped-matmul backend (moe_experts.row_layout), gather rows, run the
grouped SwiGLU, gather back and combine with the routing weights in fp32. Every permutation is a
gather with a gather backward (moe_dispatch): no one-hot [slots, experts] tensor anywhere. The
fused backends (moe_experts.FUSED_BACKENDS) do the gathers and the weighting inside their kernels
instead of materialising the sorted rows (moe_pallas.fused_routed_swiglu).

Capacity (optional `capacity_factor` cf): each expert keeps C = ceil(cf * T * K / E) slots, T the
tokens of the routing group (all tokens here; under a mesh, the tokens of one expert-parallel
group). Priority is the stable sort order: within an expert, earlier tokens win (token index,
then slot k), so the *latest* tokens are dropped; dropped slots contribute zero.

Expert parallelism (mesh given with mesh.shape[expert_axis] > 1): inside `jax.shard_map`, each
token travels once to every expert shard that owns one of its K experts, with its K local expert
ids and routing weights (a dummy id and weight 0 for slots served elsewhere); the destination
expands the rows into slots, runs its experts, sums each row's slots with their weights and sends
one row per token back, and the source sums the returned rows. So activations cross devices once
per (token, shard) pair, not once per routed slot: with K = 10 that is 5x fewer rows on 2
shards and ~1.7x fewer on 8. Buffers are fixed-size (`all_to_all`; ragged_all_to_all is not
implemented on XLA:CPU). Per-expert counts are all-gathered first, so every device knows what
every source sends everywhere; this makes capacity drops identical to the single-device ones
(sources ordered along the expert axis, which is how `token_axes` lays tokens out) and lets the
buffer sizes be chosen at run time between two static sets:
  safe: every local token to every shard, and every routed slot of the group to one device;
  fast: twice the balanced load (tokens per destination under uniform routing, T_local * K
        slots received per device).
`lax.cond` takes the fast sizes when every device's traffic fits them, else the safe ones, so
the op stays dropless-exact; XLA reserves memory for the safe buffers. Stats report which ran
(`ep_safe_path`; always 1 when the fast sizes would not be smaller, e.g. 2 shards).
A mesh whose expert axis has size 1 but whose token axes are sharded runs the same shard_map with
no exchange: each device routes its own tokens to its full copy of the experts.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen3next_jax import sharding
from qwen3next_jax.ops import moe_experts, moe_pallas
from qwen3next_jax.ops.linear import einsum_f32
from qwen3next_jax.ops.moe_dispatch import (
    combine,
    dispatch,
    exclusive_cumsum,
    gather_sum,
    place_by_group,
    round_up,
    sort_by_group,
)

EP_FAST_FACTOR = 2.0  # fast-path buffers = this x the balanced load


def router_logits(x_TD: jax.Array, w_DE: jax.Array) -> jax.Array:
    """Float32 router logits [T, E] from operands in x's dtype; a 16-bit backward
    (linear.einsum_f32: the fp32-cotangent products cost 2.2 ms at 32K tokens on an H200)."""
    return einsum_f32("td,de->te", x_TD, w_DE)


def router_topk(
    logits_TE: jax.Array,
    k: int,
    norm_topk_prob: bool = True,
    impl: str = "xla",
    *,
    mesh=None,
    token_axes=("data", "fsdp", "expert"),
):
    """Softmax over all experts in fp32, then top-k (spec §2.5).

    Returns weights_TK float32 (renormalised to sum 1 if norm_topk_prob), idx_TK int32 and
    probs_TE float32. impl: 'xla', 'pallas' (one fused kernel each way, moe_pallas.router_topk;
    Pallas interpret mode off GPU; E a power of two), or 'auto': 'pallas' when tracing for GPU
    and E is a power of two, else 'xla'. mesh: optional (default: the mesh set by jax.set_mesh,
    if any); 'pallas' then runs in shard_map with the tokens split over the token_axes present
    in it (T must divide by those shards).
    """
    if impl == "auto":
        e = logits_TE.shape[-1]
        gpu = sharding.target_platform() == "gpu"  # as _resolve_backend: the traced-for platform
        impl = "pallas" if gpu and not e & (e - 1) and k <= e else "xla"
    if impl == "pallas":

        def fn(z_TE):
            return moe_pallas.router_topk(z_TE, k, norm_topk_prob)

        if mesh is None:
            # A pallas_call outside shard_map under a mesh with Explicit axes fails to lower for
            # GPU ("requires all mesh axes to be Manual"): take the ambient mesh.
            ambient = jax.sharding.get_abstract_mesh()
            mesh = None if ambient.empty else ambient
        names = () if mesh is None else tuple(mesh.axis_names)
        tok_axes = tuple(a for a in token_axes if a in names and mesh.shape[a] > 1)
        if not tok_axes:
            return fn(logits_TE)
        # A Pallas call has no partitioning rule: without shard_map, XLA would gather every
        # token's logits onto every device and run the whole router there.
        shards = math.prod(mesh.shape[a] for a in tok_axes)
        if logits_TE.shape[0] % shards:
            raise ValueError(
                f"router_topk: {logits_TE.shape[0]} tokens must divide by {shards} token shards"
            )
        spec = P(tok_axes, None)
        if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
            logits_TE = jax.sharding.reshard(logits_TE, NamedSharding(mesh, spec))
        # check_vma=False: as routed_experts (the Pallas out_shape carries no vma annotation).
        return jax.shard_map(
            fn, mesh=mesh, in_specs=spec, out_specs=(spec, spec, spec), check_vma=False
        )(logits_TE)
    if impl != "xla":
        raise ValueError(f"router_topk impl {impl!r}: expected 'auto', 'xla' or 'pallas'")
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    weights_TK, idx_TK = jax.lax.top_k(probs_TE, k)
    if norm_topk_prob:
        weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    return weights_TK, idx_TK.astype(jnp.int32), probs_TE


def load_balancing_terms(probs_TE: jax.Array, idx_TK: jax.Array, num_experts: int, mask_T=None):
    """(f_E, P_E) float32 [E] for the Switch/Megatron loss E * sum_e f_e P_e (spec §3.2).

    f_E = routed slots per expert / (k * valid tokens); P_E = mean router prob over valid tokens.
    Uniform routing gives E * sum_e f_e P_e == 1. mask_T (optional, [T] bool/0-1) marks valid
    tokens. Only P_E carries a gradient.
    """
    t, k = idx_TK.shape
    valid_T = jnp.ones((t,), jnp.float32) if mask_T is None else mask_T.astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid_T), 1.0)
    counts_E = (
        jnp.zeros((num_experts,), jnp.float32).at[idx_TK.reshape(-1)].add(jnp.repeat(valid_T, k))
    )
    f_E = counts_E / (k * n_valid)
    P_E = jnp.einsum("te,t->e", probs_TE.astype(jnp.float32), valid_T) / n_valid
    return f_E, P_E


def _resolve_backend(backend: str) -> str:
    if backend != "auto":
        if backend not in moe_experts.BACKENDS:
            raise ValueError(
                f"unknown MoE backend {backend!r}; expected 'auto' or one of {moe_experts.BACKENDS}"
            )
        return backend
    # GPU: lax.ragged_dot's lowering densifies over groups (fails at 512 experts), and tokamax
    # 0.0.17's Mosaic kernels gave wrong weight gradients on an H200 (bench/RESULTS.md), so
    # tokamax runs only when asked for by name; pallas_fused (row-map gathers in the kernels)
    # beat pallas at 16K-64K tokens there. TPU: megablox's Pallas grouped matmul.
    # target_platform, not default_backend: an AOT compile for TPU traces on a CPU host.
    return {"tpu": "megablox", "gpu": "pallas_fused"}.get(sharding.target_platform(), "ragged_dot")


def _capacity(capacity_factor, tokens: int, k: int, num_experts: int) -> int | None:
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


def _local(x_TD, weights_TK, idx_TK, wg, wu, wd, backend, capacity):
    """Routes and computes on one device's tokens and all experts. Returns (y_TD, kept slots)."""
    t, k = idx_TK.shape
    e = wg.shape[0]
    rows, start_fn = moe_experts.row_layout(backend, t * k, e, capacity)
    limit_E = None if capacity is None else jnp.full((e,), capacity, jnp.int32)
    pl = place_by_group(idx_TK.reshape(t * k), e, rows, start_fn, limit_E)
    y_TD = _route_rows(x_TD, weights_TK, pl.pos_N.reshape(t, k), pl, wg, wu, wd, backend)
    return y_TD, pl.counts_G, jnp.sum(pl.sizes_G)


def _route_rows(x_TD, weights_TK, pos_TK, pl, wg, wu, wd, backend):
    """y_TD = sum_k weights[t, k] * expert_{slot (t, k)}(x[t]) on placed slots (pos_TK, pl):
    gather rows, grouped SwiGLU, weighted fp32 combine; one fused op for the fused backends."""
    if backend in moe_experts.FUSED_BACKENDS:
        return moe_experts.fused_routed_swiglu(
            x_TD, weights_TK, pos_TK, pl.src_R, pl.sizes_G, pl.start_G, wg, wu, wd, backend=backend
        )
    x_RD = dispatch(x_TD, pl.src_R, pos_TK)
    y_RD = moe_experts.grouped_swiglu(x_RD, pl.sizes_G, pl.start_G, wg, wu, wd, backend=backend)
    return combine(y_RD, weights_TK, pos_TK, pl.src_R, x_TD.dtype)


def _stats(counts_E, kept, num_slots, sum_axes=None, safe_path=None):
    num_slots = jnp.asarray(num_slots, jnp.int32)
    if sum_axes:
        counts_E = jax.lax.psum(counts_E, sum_axes)
        kept = jax.lax.psum(kept, sum_axes)
        num_slots = jax.lax.psum(num_slots, sum_axes)
    stats = {
        "tokens_per_expert_E": counts_E.astype(jnp.int32),
        "dropped_fraction": (num_slots - kept).astype(jnp.float32) / num_slots,
    }
    if safe_path is not None:
        safe_path = safe_path.astype(jnp.float32)
        stats["ep_safe_path"] = jax.lax.pmax(safe_path, sum_axes) if sum_axes else safe_path
    return stats


def _kept_slots(e_N, sorted_, limit_E):
    """bool [N]: entry n survives the capacity limit (the first limit_E[e] entries of expert e in
    entry order, as place_by_group keeps them); all True when limit_E is None."""
    if limit_E is None:
        return jnp.ones(e_N.shape, bool)
    order_N, gid_sorted, bounds = sorted_
    rank = jnp.arange(e_N.shape[0], dtype=jnp.int32) - bounds[gid_sorted]
    kept_sorted = rank < limit_E[gid_sorted]
    return jnp.zeros(e_N.shape, bool).at[order_N].set(kept_sorted, unique_indices=True)


def _ep_exchange(
    x_TD,
    weights_TK,
    e_TK,
    on_TSK,
    need_TS,
    wg,
    wu,
    wd,
    *,
    chunk,
    recv_slots,
    axis,
    backend,
    capacity,
):
    """One expert-parallel round trip. Each token travels once to every shard that owns one of
    its kept experts (`chunk` rows per destination), with its K slots' local expert ids and
    weights (id e_local and weight 0 for slots served elsewhere). The destination expands the
    rows into slots (at most `recv_slots` valid ones), runs its experts, sums each row's slots
    with their weights, and sends one row per token back; the source sums the returned rows.
    Returns y_TD."""
    t, s_, k = on_TSK.shape
    e_local = wg.shape[0]
    # Entries are (token, destination) pairs, m = t * S + s; unneeded pairs are invalid (id S).
    dest_M = jnp.where(need_TS, jnp.arange(s_, dtype=jnp.int32), s_).reshape(t * s_)
    send = place_by_group(
        dest_M, s_, s_ * chunk, lambda sizes_S: jnp.arange(s_, dtype=jnp.int32) * chunk
    )
    pos_TS = send.pos_N.reshape(t, s_)
    x_send = dispatch(x_TD, send.src_R, pos_TS)
    lid_MK = jnp.where(on_TSK, (e_TK % e_local)[:, None, :], e_local).reshape(t * s_, k)
    w_MK = jnp.where(on_TSK, weights_TK[:, None, :], 0.0).reshape(t * s_, k)
    lid_send = jnp.take(lid_MK, send.src_R, axis=0, mode="fill", fill_value=e_local)
    w_send = jnp.take(w_MK, send.src_R, axis=0, mode="fill", fill_value=0)

    def a2a(a):
        return jax.lax.all_to_all(a, axis, 0, 0, tiled=True)

    x_recv, lid_recv, w_recv = a2a(x_send), a2a(lid_send), a2a(w_send)
    rows, start_fn = moe_experts.row_layout(backend, recv_slots, e_local, capacity)
    grp = place_by_group(lid_recv.reshape(s_ * chunk * k), e_local, rows, start_fn)
    pos_RK = grp.pos_N.reshape(s_ * chunk, k)
    y_recv = _route_rows(x_recv, w_recv, pos_RK, grp, wg, wu, wd, backend)
    return gather_sum(a2a(y_recv), send.src_R, pos_TS, x_TD.dtype)


def _ep_body(
    x_TD, weights_TK, idx_TK, wg, wu, wd, *, axis, num_shards, sum_axes, backend, capacity_factor
):
    t, k = idx_TK.shape
    e_local = wg.shape[0]
    e = e_local * num_shards
    n = t * k
    capacity = _capacity(capacity_factor, t * num_shards, k, e)

    e_N = idx_TK.reshape(n)
    sorted_ = sort_by_group(e_N, e)
    counts_E = sorted_[2][1:] - sorted_[2][:-1]
    counts_SE = jax.lax.all_gather(counts_E, axis)  # identical on every device of the group
    if capacity is None:
        kept_SE = counts_SE
    else:
        before_SE = exclusive_cumsum(counts_SE, axis=0)
        kept_SE = jnp.clip(capacity - before_SE, 0, counts_SE)
    me = jax.lax.axis_index(axis)
    limit_E = None if capacity is None else kept_SE[me]
    kept = jnp.sum(kept_SE[me])
    keep_TK = _kept_slots(e_N, sorted_, limit_E).reshape(t, k)
    shard_S = jnp.arange(num_shards, dtype=jnp.int32)
    on_TSK = keep_TK[:, None, :] & (idx_TK[:, None, :] // e_local == shard_S[None, :, None])
    need_TS = jnp.any(on_TSK, -1)  # token t has a kept slot on shard s

    # Static buffer sizes, worst case ("safe") and twice the balanced load ("fast"): tokens per
    # destination (a token goes to a shard at most once) and valid slots received per device.
    per_dest = n if capacity is None else min(n, e_local * capacity)
    chunk_safe = min(t, per_dest)
    spread = 1.0 - (1.0 - 1.0 / num_shards) ** k  # P(token needs a given shard), uniform routing
    chunk_fast = min(chunk_safe, round_up(math.ceil(EP_FAST_FACTOR * t * spread), 8))
    slots_safe = num_shards * per_dest
    slots_fast = min(slots_safe, round_up(math.ceil(EP_FAST_FACTOR * n), 8))

    def run(chunk, recv_slots, safe_path):
        y_TD = _ep_exchange(
            x_TD,
            weights_TK,
            idx_TK,
            on_TSK,
            need_TS,
            wg,
            wu,
            wd,
            chunk=chunk,
            recv_slots=recv_slots,
            axis=axis,
            backend=backend,
            capacity=capacity,
        )
        # The stats' all-reduces run inside the branch, after its all-to-alls: XLA:CPU (jaxlib
        # 0.10.2, host devices) does not order a conditional's collectives against collectives
        # outside it, and ran them in different orders on different devices (a deadlock; an
        # optimization barrier does not survive its compiler). A value-and-gradient program can
        # still race the backward's cond against the loss's all-reduce on CPU (the tests run the
        # two as separate programs: tests/moe_testing.py); GPU and TPU programs run in order.
        return y_TD, _stats(counts_E, kept, n, sum_axes, jnp.asarray(safe_path))

    if (chunk_fast, slots_fast) != (chunk_safe, slots_safe):
        tokens_SS = jax.lax.all_gather(jnp.sum(need_TS, 0, dtype=jnp.int32), axis)
        recv_S = kept_SE.reshape(num_shards, num_shards, e_local).sum((0, 2))
        safe = (jnp.max(tokens_SS) > chunk_fast) | (jnp.max(recv_S) > slots_fast)
        return jax.lax.cond(
            safe,
            lambda: run(chunk_safe, slots_safe, True),
            lambda: run(chunk_fast, slots_fast, False),
        )
    return run(chunk_safe, slots_safe, True)


def _local_body(x_TD, weights_TK, idx_TK, wg, wu, wd, *, sum_axes, backend, capacity_factor):
    t, k = idx_TK.shape
    capacity = _capacity(capacity_factor, t, k, wg.shape[0])
    y_TD, counts_E, kept = _local(x_TD, weights_TK, idx_TK, wg, wu, wd, backend, capacity)
    return y_TD, _stats(counts_E, kept, t * k, sum_axes)


def routed_experts(
    x_TD,
    weights_TK,
    idx_TK,
    w_gate_EDF,
    w_up_EDF,
    w_down_EFD,
    *,
    backend="auto",
    capacity_factor=None,
    mesh=None,
    expert_axis="expert",
    token_axes=("data", "fsdp", "expert"),
):
    """y_TD = sum_k weights_TK[t,k] * SwiGLU_{idx_TK[t,k]}(x_TD[t]), and routing stats.

    x_TD [T, D] bf16/fp32; weights_TK [T, K] float32; idx_TK [T, K] int32 in [0, E);
    w_gate_EDF, w_up_EDF [E, D, F], w_down_EFD [E, F, D] (cast to x's dtype for the matmuls,
    which accumulate in fp32). The combine is fp32, cast to x's dtype.
    backend: 'auto' | 'ragged_dot' | 'tokamax' | 'pallas' | 'pallas_fused' | 'megablox' |
      'megablox_interpret' | 'padded' | 'dense' (moe_experts). auto = megablox on TPU, pallas on
      GPU, ragged_dot elsewhere (tokamax only by name: see _resolve_backend).
    capacity_factor: None = dropless; else per-expert capacity ceil(cf * T_group * K / E).
    mesh: optional; when it shards the experts (expert_axis) or the tokens (token_axes present
      in it), the op runs in shard_map with tokens split over token_axes and experts over
      expert_axis (see module docstring). T must divide by the token shards, E by the expert ones.
    Returns (y_TD, stats): tokens_per_expert_E int32 [E] (global routed slots per expert),
    dropped_fraction float32 scalar (global), and ep_safe_path (0/1) under expert parallelism.
    """
    backend = _resolve_backend(backend)
    names = () if mesh is None else tuple(mesh.axis_names)
    tok_axes = tuple(a for a in token_axes if a in names)
    num_shards = mesh.shape[expert_axis] if expert_axis in names else 1
    tok_shards = math.prod(mesh.shape[a] for a in tok_axes) if tok_axes else 1
    # Explicit token / expert axes of size 1 still type the arrays as sharded over them, which
    # the local ops refuse (a sort over a "sharded" slot dimension; Pallas's interpreter):
    # shard_map below runs them on its one shard
    size_one_explicit = (
        mesh is not None
        and jax.sharding.AxisType.Explicit in mesh.axis_types
        and bool(tok_axes or expert_axis in names)
    )
    if mesh is None or (num_shards == 1 and tok_shards == 1 and not size_one_explicit):
        t, k = idx_TK.shape
        capacity = _capacity(capacity_factor, t, k, w_gate_EDF.shape[0])
        y_TD, counts_E, kept = _local(
            x_TD, weights_TK, idx_TK, w_gate_EDF, w_up_EDF, w_down_EFD, backend, capacity
        )
        return y_TD, _stats(counts_E, kept, t * k)

    if x_TD.shape[0] % tok_shards or w_gate_EDF.shape[0] % num_shards:
        raise ValueError(
            f"routed_experts: {x_TD.shape[0]} tokens must divide by {tok_shards} token shards "
            f"and {w_gate_EDF.shape[0]} experts by {num_shards} expert shards"
        )
    tok_spec = P(tok_axes or None, None)
    w_spec = P(expert_axis if num_shards > 1 else None, None, None)
    if num_shards > 1:
        body = lambda *a: _ep_body(  # noqa: E731
            *a,
            axis=expert_axis,
            num_shards=num_shards,
            sum_axes=tok_axes,
            backend=backend,
            capacity_factor=capacity_factor,
        )
    else:
        body = lambda *a: _local_body(  # noqa: E731
            *a, sum_axes=tok_axes, backend=backend, capacity_factor=capacity_factor
        )
    in_specs = (tok_spec, tok_spec, tok_spec, w_spec, w_spec, w_spec)
    args = (x_TD, weights_TK, idx_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        # Explicit axes: shard_map wants inputs already laid out as in_specs.
        args = tuple(
            jax.sharding.reshard(a, NamedSharding(mesh, s))
            for a, s in zip(args, in_specs, strict=True)
        )
    stats_spec = {"tokens_per_expert_E": P(), "dropped_fraction": P()}
    if num_shards > 1:
        stats_spec["ep_safe_path"] = P()
    # check_vma=False: the Pallas backend's out_shape would otherwise need per-version vma
    # annotations; every replicated output here is made so explicitly (psum / pmax).
    fn = jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=(tok_spec, stats_spec), check_vma=False
    )
    return fn(*args)
