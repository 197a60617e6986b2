"""Gated delta rule, the sequence mixer of Gated DeltaNet (spec §2.4.6, §4).

Per value head j, with a float32 state S [Dk, Dv] ("K-major") and key head j // (HV // H):

    S <- exp(g_t) S;  u_t = beta_t (v_t - S^T k_t);  S <- S + k_t u_t^T;  o_t = S^T (scale q_t)

Entry points (same signature; q, k [B,T,H,Dk]; v [B,T,HV,Dv]; g, beta [B,T,HV]):
  recurrent_gated_delta_rule  token-by-token lax.scan; the reference.
  chunk_gated_delta_rule      chunked WY form (spec §4.3), memory-lean custom VJP.
  gated_delta_rule            dispatcher over backends ("chunk", "recurrent", "pallas",
                              "pallas_interpret", "auto").
  gated_delta_rule_step       one token, for decoding.

Packed sequences: segment_ids [B,T] int, equal nonzero ids form a document, 0 is padding. A real
token whose id differs from the previous token's id starts from a zero state; initial_state belongs
to the document holding token 0; padding tokens leave the state untouched and output 0, so the
final state is the state after the last real token.

Platforms. On TPU the pure-JAX chunk path runs today as "chunk_mxu": its intra-chunk work is
batched einsums (the q kᵀ and k kᵀ Gram products with bf16 operands and fp32 accumulation, one
MXU pass) and a unit-lower-triangular inverse built from products, its inter-chunk pass one
lax.scan over the fp32 state; the inverse, W, U and the state pass are fp32 at Precision.HIGHEST.
On CPU "chunk" is all fp32 at HIGHEST. On GPU "auto" takes the Pallas Triton kernels of
delta_rule_pallas.py for 16-bit inputs. A Mosaic TPU kernel plugs in at the seam the Pallas GPU
kernels use: `_chunk_prepare` (masking, padding, chunk-local cumsum of g, chunk-local segment
counters; plain autodiff) feeds a core with the contract of `_chunk_core` -- (q, k, v, gamma,
beta, seg, state0) -> (o, final_state) with its own custom VJP -- so a `delta_rule_mosaic.py`
core registered as a backend in `gated_delta_rule` reuses everything around it. Kernel cores are
single-device programs: under an active `sharding.use_mesh` the dispatcher runs them inside
jax.shard_map over the batch shards (`_over_batch_shards`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen3next_jax import sharding

_HIGHEST = jax.lax.Precision.HIGHEST
_einsum = functools.partial(jnp.einsum, precision=_HIGHEST)

BACKENDS = ("auto", "chunk", "chunk_mxu", "recurrent", "pallas", "pallas_interpret")


# --------------------------------------------------------------------------------------------
# Input checks and shared preparation
# --------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, g, beta, initial_state, segment_ids):
    """Returns (B, T, H, Dk, HV, Dv); raises ValueError naming the first bad value."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, Dk]; got shape {tuple(q.shape)}.")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k has shape {tuple(k.shape)}, which differs from q's {tuple(q.shape)}.")
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, HV, Dv] with B, T = {B}, {T}; got {tuple(v.shape)}.")
    HV, V = v.shape[2], v.shape[3]
    if HV % H:
        raise ValueError(f"v has {HV} heads, which is not a multiple of q/k's {H} heads.")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, T, HV):
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; expected [B, T, HV] = {(B, T, HV)}."
            )
    if initial_state is not None and tuple(initial_state.shape) != (B, HV, K, V):
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)}; "
            f"expected [B, HV, Dk, Dv] = {(B, HV, K, V)}."
        )
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (B, T):
            raise ValueError(
                f"segment_ids has shape {tuple(segment_ids.shape)}; expected [B, T] = {(B, T)}."
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers; got dtype {segment_ids.dtype}.")
    return B, T, H, K, HV, V


def _check_chunk_size(chunk_size):
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")


def _segment_flags(segment_ids, B, T):
    """real_BT (token is not padding) and reset_BT (state is zeroed before the token), bool."""
    if segment_ids is None:
        return jnp.ones((B, T), bool), jnp.zeros((B, T), bool)
    prev_BT = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    real_BT = segment_ids != 0
    return real_BT, real_BT & (segment_ids != prev_BT)


def _initial_state(initial_state, B, HV, K, V):
    if initial_state is None:
        return jnp.zeros((B, HV, K, V), jnp.float32)
    return initial_state.astype(jnp.float32)


def _segmented_cumsum(g_BNCH, resets_BNC):
    """Cumulative sum over the chunk axis that restarts at every document start.

    Only same-document differences of it are ever used, but restarting keeps a document's decays
    free of the rounding of its predecessor's sum, so packed documents match solo runs bit for bit.
    """

    def combine(a, b):
        (fa, va), (fb, vb) = a, b
        return fa | fb, jnp.where(fb, vb, va + vb)

    flags = jnp.broadcast_to(resets_BNC[..., None], g_BNCH.shape)
    return jax.lax.associative_scan(combine, (flags, g_BNCH), axis=2)[1]


def _chunk_prepare(q, k, v, g, beta, segment_ids, scale, chunk_size):
    """Shared front end of every chunked core (plain autodiff).

    Returns q_BTHK (times scale), k_BTHK, v_BTHV, fp32 gamma_BTH (chunk-local cumsum of g) and
    beta_BTH, and int32 seg_BT (chunk-local count of resets, so equal values share a document
    inside a chunk), with T padded to a multiple of chunk_size. q, k, v are cast to fp32, except
    with scale=None (the kernels' path): then they keep their dtypes and q is not scaled.
    Padding tokens (segment id 0 or the tail pad) get q = k = v = g = beta = 0: no decay, no
    write, zero output; jnp.where also keeps their gradients exactly zero.
    """
    B, T, H, K = q.shape
    HV = v.shape[2]
    real_BT, reset_BT = _segment_flags(segment_ids, B, T)
    if scale is not None:
        q, k, v = q.astype(jnp.float32) * scale, k.astype(jnp.float32), v.astype(jnp.float32)
    g, beta = g.astype(jnp.float32), beta.astype(jnp.float32)
    if segment_ids is not None:
        real4, real3 = real_BT[:, :, None, None], real_BT[:, :, None]
        q, k, v = (jnp.where(real4, x, 0.0) for x in (q, k, v))
        g, beta = (jnp.where(real3, x, 0.0) for x in (g, beta))
    pad = (-T) % chunk_size
    if pad:
        widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        q, k, v, g, beta, reset_BT = (jnp.pad(x, widths(x)) for x in (q, k, v, g, beta, reset_BT))
    Tp = T + pad
    N = Tp // chunk_size
    resets_BNC = reset_BT.reshape(B, N, chunk_size)
    gamma = _segmented_cumsum(g.reshape(B, N, chunk_size, HV), resets_BNC).reshape(B, Tp, HV)
    seg = jnp.cumsum(resets_BNC.astype(jnp.int32), axis=2)
    return q, k, v, gamma, beta, seg.reshape(B, Tp)


# --------------------------------------------------------------------------------------------
# Recurrent reference and single step
# --------------------------------------------------------------------------------------------


def _step_grouped(q_BHK, k_BHK, v_BHRV, g_BHR, beta_BHR, state_BHRKV):
    """One token of §2.4.6 on grouped heads (value head h*R + r reads key head h); q scaled."""
    state_BHRKV = jnp.exp(g_BHR)[..., None, None] * state_BHRKV
    kv_mem_BHRV = _einsum("bhk,bhrkv->bhrv", k_BHK, state_BHRKV)
    delta_BHRV = beta_BHR[..., None] * (v_BHRV - kv_mem_BHRV)
    state_BHRKV = state_BHRKV + k_BHK[:, :, None, :, None] * delta_BHRV[:, :, :, None, :]
    o_BHRV = _einsum("bhk,bhrkv->bhrv", q_BHK, state_BHRKV)
    return o_BHRV, state_BHRKV


def recurrent_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None, chunk_size=64
):
    """Token-by-token reference (lax.scan over T), all math fp32.

    Args: q, k [B,T,H,Dk]; v [B,T,HV,Dv]; g (log decay <= 0), beta [B,T,HV]; initial_state
    [B,HV,Dk,Dv] or None (zeros); segment_ids [B,T] int or None; chunk_size is ignored.
    Returns o [B,T,HV,Dv] in v's dtype and the final state [B,HV,Dk,Dv] float32.
    """
    del chunk_size
    B, T, H, K, HV, V = _check_inputs(q, k, v, g, beta, initial_state, segment_ids)
    R = HV // H
    scale = K**-0.5 if scale is None else scale
    real_BT, reset_BT = _segment_flags(segment_ids, B, T)
    state_BHRKV = _initial_state(initial_state, B, HV, K, V).reshape(B, H, R, K, V)

    def step(state_BHRKV, xs):
        q_BHK, k_BHK, v_BHRV, g_BHR, beta_BHR, real_B, reset_B = xs
        state_BHRKV = jnp.where(reset_B[:, None, None, None, None], 0.0, state_BHRKV)
        o_BHRV, new_BHRKV = _step_grouped(q_BHK, k_BHK, v_BHRV, g_BHR, beta_BHR, state_BHRKV)
        state_BHRKV = jnp.where(real_B[:, None, None, None, None], new_BHRKV, state_BHRKV)
        return state_BHRKV, jnp.where(real_B[:, None, None, None], o_BHRV, 0.0)

    f32 = lambda x: x.astype(jnp.float32)
    xs_BT = (
        f32(q) * scale,
        f32(k),
        f32(v).reshape(B, T, H, R, V),
        f32(g).reshape(B, T, H, R),
        f32(beta).reshape(B, T, H, R),
        real_BT,
        reset_BT,
    )
    state_BHRKV, o_TBHRV = jax.lax.scan(step, state_BHRKV, [jnp.moveaxis(x, 1, 0) for x in xs_BT])
    o_BTHV = jnp.moveaxis(o_TBHRV, 0, 1).reshape(B, T, HV, V)
    return o_BTHV.astype(v.dtype), state_BHRKV.reshape(B, HV, K, V)


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None):
    """One decoding token. q, k [B,H,Dk]; v [B,HV,Dv]; g, beta [B,HV]; state [B,HV,Dk,Dv].

    Returns o [B,HV,Dv] in v's dtype and the new state [B,HV,Dk,Dv] float32.
    """
    if q.ndim != 3 or k.shape != q.shape:
        raise ValueError(
            f"q and k must both be [B, H, Dk]; got {tuple(q.shape)} and {tuple(k.shape)}."
        )
    B, H, K = q.shape
    if v.ndim != 3 or v.shape[0] != B or v.shape[1] % H:
        raise ValueError(
            f"v must be [B, HV, Dv] with B = {B} and HV a multiple of {H}; got {tuple(v.shape)}."
        )
    HV, V = v.shape[1], v.shape[2]
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, HV):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B, HV] = {(B, HV)}.")
    if tuple(state.shape) != (B, HV, K, V):
        raise ValueError(
            f"state has shape {tuple(state.shape)}; expected [B, HV, Dk, Dv] = {(B, HV, K, V)}."
        )
    R = HV // H
    scale = K**-0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)
    o_BHRV, state_BHRKV = _step_grouped(
        f32(q) * scale,
        f32(k),
        f32(v).reshape(B, H, R, V),
        f32(g).reshape(B, H, R),
        f32(beta).reshape(B, H, R),
        f32(state).reshape(B, H, R, K, V),
    )
    return o_BHRV.reshape(B, HV, V).astype(v.dtype), state_BHRKV.reshape(B, HV, K, V)


# --------------------------------------------------------------------------------------------
# Chunked core (pure JAX)
# --------------------------------------------------------------------------------------------
# Layout inside the core: chunks first so lax.scan walks axis 0; value heads grouped as (H, R)
# so q/k are never repeated. Shapes: q, k [N,B,H,C,K]; v [N,B,H,R,C,V]; gamma, beta
# [N,B,H,R,C]; seg [N,B,C]; state [B,H,R,K,V].


def _unit_lower_inverse(a_CC: jax.Array) -> jax.Array:
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], by matrix products only.

    A is nilpotent, so (I + A)^-1 = sum_{j<C} (-A)^j = prod_i (I + (-A)^(2^i)): 2*log2(C) - 2
    batched matmuls. Products rather than LAPACK's trsm because jaxlib's CPU trsm custom call
    deadlocks XLA:CPU's thread pool on 2-core machines when two run concurrently, and products
    map onto matrix units on GPU and TPU.
    """
    C = a_CC.shape[-1]
    n_CC = -a_CC
    s_CC = jnp.eye(C, dtype=a_CC.dtype) + n_CC  # sum_{j<2k} n^j with k = 1
    p_CC, k = n_CC, 1
    while 2 * k < C:
        p_CC = _einsum("...ij,...jk->...ik", p_CC, p_CC)  # n^(2k)
        s_CC = s_CC + _einsum("...ij,...jk->...ik", s_CC, p_CC)  # sum_{j<4k} n^j
        k *= 2
    return s_CC


def _gram(x_NBHCK, y_NBHCK, mxu: bool):
    """x yᵀ within each chunk, [N,B,H,C,C] fp32.

    mxu=True feeds the matrix unit bf16 operands with fp32 accumulation (one MXU pass instead of
    HIGHEST's six on TPU); only these Gram products of unit-norm q, k take it: the inverse, W, U
    and the state pass stay fp32 at HIGHEST, where bf16 noise compounds (spec P9, P10).
    """
    if mxu:
        bf16 = jnp.bfloat16
        return jnp.einsum(
            "nbhck,nbhsk->nbhcs",
            x_NBHCK.astype(bf16),
            y_NBHCK.astype(bf16),
            preferred_element_type=jnp.float32,
        )
    return _einsum("nbhck,nbhsk->nbhcs", x_NBHCK, y_NBHCK)


def _intra(q_NBHCK, k_NBHCK, v_NBHRCV, gamma_NBHRC, beta_NBHRC, seg_NBC, mxu=False):
    """Everything that is parallel over chunks (spec §4.3 steps 2-6 plus the read-out pieces).

    Segment boundaries inside a chunk act as a log-decay of -inf: the decay matrix is masked to
    same-document pairs, and the carried-in state reaches only rows of the chunk's first
    document (seg == 0). Masked entries are replaced before exp, never exp'd, so no inf/NaN.
    """
    C = seg_NBC.shape[-1]
    causal_CC = jnp.tril(jnp.ones((C, C), bool))
    strict_CC = jnp.tril(jnp.ones((C, C), bool), -1)
    same_NBCC = seg_NBC[..., :, None] == seg_NBC[..., None, :]
    mask6 = (same_NBCC & causal_CC)[:, :, None, None]
    strict6 = (same_NBCC & strict_CC)[:, :, None, None]
    diff_NBHRCC = gamma_NBHRC[..., :, None] - gamma_NBHRC[..., None, :]
    decay_NBHRCC = jnp.where(mask6, jnp.exp(jnp.where(mask6, diff_NBHRCC, 0.0)), 0.0)

    kk_NBHCC = _gram(k_NBHCK, k_NBHCK, mxu)
    a_NBHRCC = jnp.where(
        strict6, beta_NBHRC[..., :, None] * kk_NBHCC[:, :, :, None] * decay_NBHRCC, 0.0
    )
    first5 = (seg_NBC == 0)[:, :, None, None, :]
    gexp_NBHRC = jnp.where(first5, jnp.exp(jnp.where(first5, gamma_NBHRC, 0.0)), 0.0)
    vb_NBHRCV = beta_NBHRC[..., None] * v_NBHRCV
    kbg_NBHRCK = (beta_NBHRC * gexp_NBHRC)[..., None] * k_NBHCK[:, :, :, None]
    V = v_NBHRCV.shape[-1]
    # (I + A)^-1 in fp32 at HIGHEST precision (P9, P10): A's entries are bounded by 1 but the
    # inverse can grow.
    inv_NBHRCC = _unit_lower_inverse(a_NBHRCC)
    sol = _einsum("...cs,...sd->...cd", inv_NBHRCC, jnp.concatenate([vb_NBHRCV, kbg_NBHRCK], -1))
    u_NBHRCV, w_NBHRCK = sol[..., :V], sol[..., V:]

    qk_NBHCC = _gram(q_NBHCK, k_NBHCK, mxu)
    aqk_NBHRCC = qk_NBHCC[:, :, :, None] * decay_NBHRCC
    qd_NBHRCK = gexp_NBHRC[..., None] * q_NBHCK[:, :, :, None]
    last5 = (seg_NBC == seg_NBC[..., -1:])[:, :, None, None, :]
    to_end_NBHRC = gamma_NBHRC[..., -1:] - gamma_NBHRC
    kdecay_NBHRC = jnp.where(last5, jnp.exp(jnp.where(last5, to_end_NBHRC, 0.0)), 0.0)
    kd_NBHRCK = kdecay_NBHRC[..., None] * k_NBHCK[:, :, :, None]
    passes_NB = (seg_NBC[..., -1] == 0)[:, :, None, None]
    sd_NBHR = jnp.where(passes_NB, jnp.exp(jnp.where(passes_NB, gamma_NBHRC[..., -1], 0.0)), 0.0)
    return w_NBHRCK, u_NBHRCV, qd_NBHRCK, aqk_NBHRCC, kd_NBHRCK, sd_NBHR


def _inter_step(state_BHRKV, per_chunk):
    """One chunk of the sequential pass (spec §4.3 step 7). Returns (new state, o_BHRCV)."""
    w, u, qd, aqk, kd, sd_BHR = per_chunk
    vnew_BHRCV = u - _einsum("bhrck,bhrkv->bhrcv", w, state_BHRKV)
    o_BHRCV = _einsum("bhrck,bhrkv->bhrcv", qd, state_BHRKV) + _einsum(
        "bhrcs,bhrsv->bhrcv", aqk, vnew_BHRCV
    )
    new_BHRKV = sd_BHR[..., None, None] * state_BHRKV + _einsum(
        "bhrck,bhrcv->bhrkv", kd, vnew_BHRCV
    )
    return new_BHRKV, o_BHRCV


def _core_forward(q, k, v, gamma, beta, seg, state0_BHRKV, mxu=False):
    """Returns (o_NBHRCV, final state, chunk-start states [N,B,H,R,K,V])."""
    per_chunk = _intra(q, k, v, gamma, beta, seg, mxu)

    def body(state, xs):
        new, o = _inter_step(state, xs)
        return new, (o, state)

    final, (o, starts) = jax.lax.scan(body, state0_BHRKV, per_chunk)
    return o, final, starts


def _chunk_core_autodiff(q, k, v, gamma, beta, seg, state0_BHRKV):
    """The core with plain autodiff through intra and the scan (kept to measure the VJP's gain)."""
    o, final, _ = _core_forward(q, k, v, gamma, beta, seg, state0_BHRKV)
    return o, final


# Chunks recomputed together in one step of the backward's reverse scan: intra-chunk temporaries
# stay O(_BWD_GROUP * B*HV*C*(C+Dk+Dv)) whatever T is, while each step still batches
# _BWD_GROUP*B*HV triangular inverses. (A parallel recompute over all chunks would be O(T*HV*C),
# and XLA is free to hoist it into the forward, where it lives across the whole model.)
_BWD_GROUP = 8


def _make_chunk_core(mxu: bool):
    """The chunked core with a memory-lean VJP; ``mxu`` as in :func:`_gram`.

    core(q, k, v, gamma, beta, seg, state0_BHRKV) -> (o_NBHRCV fp32, final state_BHRKV fp32).
    Residuals are the inputs plus the chunk-start states: O(T*H*Dk + T*HV*Dv + N*HV*Dk*Dv)
    floats. The backward walks groups of _BWD_GROUP chunks in reverse; per group it recomputes
    the intra-chunk quantities (decay, A, the triangular inverse, W, U) in parallel, runs the
    per-chunk VJP of the sequential step in reverse, and maps the result back through the
    group's intra-chunk VJP.
    """

    @jax.custom_vjp
    def core(q, k, v, gamma, beta, seg, state0_BHRKV):
        o, final, _ = _core_forward(q, k, v, gamma, beta, seg, state0_BHRKV, mxu)
        return o, final

    def core_fwd(q, k, v, gamma, beta, seg, state0_BHRKV):
        o, final, starts = _core_forward(q, k, v, gamma, beta, seg, state0_BHRKV, mxu)
        return (o, final), (q, k, v, gamma, beta, seg, starts)

    def core_bwd(res, cts):
        q, k, v, gamma, beta, seg, starts = res
        do_NBHRCV, dfinal_BHRKV = cts
        N = q.shape[0]
        G = min(N, _BWD_GROUP)
        pad = (-N) % G
        # Trailing no-op chunks (all zero: no decay, no write, zero output) make N a multiple of
        # G; the reverse walk meets them first and passes the state cotangent through unchanged.
        grouped = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
            (N + pad) // G, G, *x.shape[1:]
        )
        xs = tuple(grouped(x) for x in (q, k, v, gamma, beta, seg, starts, do_NBHRCV))

        def step_back(dstate, xs):
            state, chunk, do = xs
            _, step_vjp = jax.vjp(_inter_step, state, chunk)
            return step_vjp((dstate, do))

        def group_back(dstate, xs):
            q, k, v, gamma, beta, seg, starts, do = xs
            intra = lambda *a: _intra(*a, seg, mxu)  # noqa: B023 - seg is this group's
            per_chunk, intra_vjp = jax.vjp(intra, q, k, v, gamma, beta)
            dstate, dper_chunk = jax.lax.scan(
                step_back, dstate, (starts, per_chunk, do), reverse=True
            )
            return dstate, intra_vjp(dper_chunk)

        dstate0, dxs = jax.lax.scan(group_back, dfinal_BHRKV, xs, reverse=True)
        dq, dk, dv, dgamma, dbeta = (d.reshape(N + pad, *d.shape[2:])[:N] for d in dxs)
        return dq, dk, dv, dgamma, dbeta, None, dstate0

    core.defvjp(core_fwd, core_bwd)
    return core


_chunk_core = _make_chunk_core(mxu=False)
_chunk_core_mxu = _make_chunk_core(mxu=True)


def _chunk_impl(q, k, v, g, beta, scale, initial_state, segment_ids, chunk_size, core):
    B, T, H, K, HV, V = _check_inputs(q, k, v, g, beta, initial_state, segment_ids)
    _check_chunk_size(chunk_size)
    R, C = HV // H, chunk_size
    scale = K**-0.5 if scale is None else scale
    q_, k_, v_, gamma, beta_, seg = _chunk_prepare(q, k, v, g, beta, segment_ids, scale, C)
    N = q_.shape[1] // C
    qk_layout = lambda x: x.reshape(B, N, C, H, K).transpose(1, 0, 3, 2, 4)
    hv_layout = lambda x: x.reshape(B, N, C, H, R).transpose(1, 0, 3, 4, 2)
    o_NBHRCV, final_BHRKV = core(
        qk_layout(q_),
        qk_layout(k_),
        v_.reshape(B, N, C, H, R, V).transpose(1, 0, 3, 4, 2, 5),
        hv_layout(gamma),
        hv_layout(beta_),
        seg.reshape(B, N, C).transpose(1, 0, 2),
        _initial_state(initial_state, B, HV, K, V).reshape(B, H, R, K, V),
    )
    o_BTHV = o_NBHRCV.transpose(1, 0, 4, 2, 3, 5).reshape(B, N * C, HV, V)[:, :T]
    return o_BTHV.astype(v.dtype), final_BHRKV.reshape(B, HV, K, V)


def chunk_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None, chunk_size=64
):
    """Chunked gated delta rule (spec §4.3) in pure JAX; same contract as the recurrent one.

    Intra-chunk work (decayed beta*K K^T, unit-lower-triangular inverse, W and U) runs in parallel
    over all chunks in fp32 at Precision.HIGHEST; a lax.scan over chunks carries the fp32 state.
    T is padded to a multiple of chunk_size with no-op tokens. Memory-lean custom VJP: the
    activations kept for the backward are the fp32 inputs and the N = ceil(T / chunk_size)
    chunk-start states, O(T*H*Dk + T*HV*Dv + N*HV*Dk*Dv); intra-chunk tensors (O(T*HV*C)) are
    recomputed. segment_ids are not differentiable.

    Returns o [B,T,HV,Dv] in v's dtype and the final state [B,HV,Dk,Dv] float32.
    """
    return _chunk_impl(q, k, v, g, beta, scale, initial_state, segment_ids, chunk_size, _chunk_core)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def _pallas_supported(q, v, chunk_size):
    """Shapes the Pallas kernels take (Triton tiles are powers of two, dots at least 16)."""
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    return pow2(q.shape[-1]) and pow2(v.shape[-1]) and chunk_size in (16, 32, 64)


def resolve_auto(kernel_inputs_ok: bool = True) -> str:
    """What "auto" runs on `sharding.target_platform()`: chunk_mxu on TPU, the Pallas kernels on
    GPU when ``kernel_inputs_ok`` (16-bit q, k, v of supported shapes), else chunk."""
    platform = sharding.target_platform()
    if platform == "tpu":
        return "chunk_mxu"
    return "pallas" if platform == "gpu" and kernel_inputs_ok else "chunk"


def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    segment_ids=None,
    chunk_size=64,
    backend="auto",
):
    """Gated delta rule through the chosen backend; same arguments and results as the others.

    backend: "chunk" (pure-JAX chunked, any platform), "chunk_mxu" (the same with bf16 Gram
    products q kᵀ, k kᵀ on the matrix unit; the TPU path), "recurrent" (token-by-token reference),
    "pallas" (Triton GPU kernels), "pallas_interpret" (the same kernels interpreted, for CPU
    tests), or "auto": "chunk_mxu" on TPU; "pallas" on GPU for 16-bit q, k, v when Dk and Dv are
    powers of two >= 16 and chunk_size is 16, 32 or 64; else "chunk". The platform is
    `sharding.target_platform()`, so an ahead-of-time TPU compile on a CPU host takes the TPU path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown gated delta rule backend {backend!r}; choose one of {BACKENDS}.")
    if backend == "auto":
        half = all(jnp.dtype(x.dtype).itemsize == 2 for x in (q, k, v))
        backend = resolve_auto(half and _pallas_supported(q, v, chunk_size))
    kwargs = dict(
        scale=scale, initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size
    )
    if backend == "chunk":
        return chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)
    if backend == "chunk_mxu":
        return _chunk_impl(
            q, k, v, g, beta, scale, initial_state, segment_ids, chunk_size, _chunk_core_mxu
        )
    if backend == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    from qwen3next_jax.ops import delta_rule_pallas

    kernel = functools.partial(
        delta_rule_pallas.pallas_gated_delta_rule,
        interpret=backend == "pallas_interpret",
        scale=scale,
        chunk_size=chunk_size,
    )
    return _over_batch_shards(kernel, q, k, v, g, beta, initial_state, segment_ids)


def _over_batch_shards(kernel, q, k, v, g, beta, initial_state, segment_ids):
    """Runs a single-device kernel core per batch shard of the active mesh.

    GSPMD cannot partition a Pallas call: left alone under a sharded jit it would gather the
    whole batch onto every device. Rows are independent, so inside `jax.shard_map` each device
    runs its own rows; heads stay whole (a 'tensor'-sharded head axis is gathered first). Without
    a mesh, or when the batch does not split evenly, the kernel runs as is.
    """
    opt = {"initial_state": initial_state, "segment_ids": segment_ids}
    ctx = sharding.current()
    batch_axes = (
        None if ctx is None else sharding.logical_to_spec(("batch",), ctx.rules, ctx.mesh)[0]
    )
    if batch_axes is None:
        return kernel(q, k, v, g, beta, **opt)
    names = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    if q.shape[0] % math.prod(ctx.mesh.shape[a] for a in names):
        return kernel(q, k, v, g, beta, **opt)
    present = {n: x for n, x in opt.items() if x is not None}
    args = (q, k, v, g, beta, *present.values())
    specs = tuple(P(batch_axes, *([None] * (x.ndim - 1))) for x in args)
    if any(t == jax.sharding.AxisType.Explicit for t in ctx.mesh.axis_types):
        args = tuple(
            jax.sharding.reshard(a, NamedSharding(ctx.mesh, sp))
            for a, sp in zip(args, specs, strict=True)
        )

    def body(q, k, v, g, beta, *rest):
        return kernel(q, k, v, g, beta, **dict(zip(present, rest, strict=True)))

    out_specs = (P(batch_axes, None, None, None), P(batch_axes, None, None, None))
    # check_vma=False: pallas_call's outputs carry no varying-axes annotation.
    fn = jax.shard_map(body, mesh=ctx.mesh, in_specs=specs, out_specs=out_specs, check_vma=False)
    return fn(*args)
