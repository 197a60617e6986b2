"""Pallas (Triton backend) kernels for the chunked gated delta rule on GPU.

Same contract as `delta_rule.chunk_gated_delta_rule`; reached through
`delta_rule.gated_delta_rule(..., backend="pallas" | "pallas_interpret")`. The pipeline mirrors
spec §4.4 with T padded to N chunks of C tokens (gamma = chunk-local cumsum of g), default
launch config (_Cfg; the alternatives stay as tuning options and are tested):

gates     _gates_kernel      grid (B, N)        gamma (segmented cumsum as one masked product),
                                                beta, transposed to [B, HV, Tp]; its backward
                                                _gates_bwd_kernel
forward   _solve_kernel      grid (B, HV, N)    Tinv = (I + A)^-1 per value head, [B,HV,Tp,C]
          _wu_kernel         grid (B, HV, N)    W, U = Tinv (beta k e^gamma, beta v), C-row
                                                products (split_intra=False: _intra_kernel
                                                does both on 16-row sub-blocks)
          _state_fwd_kernel  grid (B, G, HV, V/BV) sequential over the chunks of each of G
                                                sequence groups: chunk-start states,
                                                v_new = U - W S, end state
          _state_end_kernel  grid (B, G, HV, V/BV), (B, G, HV, K/BV), only when G > 1: each
                                                group's end state from zero and its [K, K]
                                                transition; XLA chains the G groups' start
                                                states (G = 1 unless batch x heads is small)
          _output_kernel     grid (B, HV, N, V/BV)  o = scale (q e^gamma S + (q k^T . L) v_new)
backward  _wu_kernel again, from the saved inverse (the inputs, chunk-start states and
                                                the inverse are saved; save_tinv=False reruns
                                                _solve_kernel too)
          _vn_kernel         grid (B, HV, N, V/BV)  v_new again
          _state_bwd_kernel  grid (B, G, HV, V/BV) reverse over chunks: dS at every chunk
                                                end, dv_new (with the chunk-local
                                                (q k^T . L)^T do computed in the loop),
                                                d initial_state (_state_bwd_end_kernel: the
                                                groups' split, as in the forward)
          _dqk_kernel        grid (B, HV, N)    dq, dk and dgamma through the read-out and S
          _wy_bwd_kernel     grid (B, HV, N)    dk, dv, dbeta, dgamma through (I + A)^-1, from
                                                the stored inverse, C-row products
          (the value-head grids give per-value-head dq, dk, summed over each group by XLA;
          fuse_bwd=True runs both in _bwd_fused_kernel, not yet timed on a GPU)

Key heads: kernels on a value-head grid read key head j // R through their index maps; kernels
on a key-head grid loop over the R value heads of the group, so q/k are never repeated. The
triangular inverse is done on 16-row sub-blocks: repeated squaring inside each diagonal block
(inv_power=False: row-by-row forward substitution), then block forward substitution with small
fp32-accumulated products, TF32 on the GPU (P9). The state recurrence is linear in the state and
acts on its value columns independently: the value-block grid fills the GPU when batch x value
heads x V/BV is large, and the sequence-group split (end(S0) = T S0 + end(0) per group, one
G-step chain) when it is not. Storage of intermediates (W, U,
v_new, chunk states, the inverse) and the operands of the large products use v's dtype when it
is 16-bit (as fla does), else float32 at Precision.HIGHEST; accumulators and the carried state
are fp32. Segment boundaries work as in the pure-JAX core (chunk-local segment counters mask the
decay).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from qwen3next_jax.ops import delta_rule as dr

_F32 = jnp.float32
_SUB = 16  # rows of a sub-block of the triangular inverse (smallest Triton dot)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static configuration shared by the kernels of one call."""

    B: int
    Tp: int
    H: int
    HV: int
    K: int
    V: int
    C: int
    scale: float
    store: str  # dtype name of stored intermediates and product operands
    interpret: bool
    # Launch tuning: V block of the sequential (bv_seq) and parallel (bv_par) value-head
    # kernels, warps of the sequential / parallel / key-head-group kernels, pipeline stages of
    # the sequential loops.
    # bv_seq / warps_seq / warps_seq_bwd 0 = auto: 64 columns (4 warps forward, 8 reverse)
    # when that grid still has a program for every SM of the GPU (8x4K tokens on an H200:
    # forward 0.98 -> 0.53 ms, reverse 1.13 -> 0.99), else 32 and 4 warps (at B1 T32K 64 would
    # leave half the SMs idle)
    bv_seq: int = 0
    bv_par: int = 128
    bv_dqk: int = 128
    warps_seq: int = 0
    warps_seq_bwd: int = 0
    num_sms: int = 132  # the GPU's multiprocessors (pallas_gated_delta_rule reads the device's)
    warps_par: int = 4
    # one warp for the inverse: its 16x16 pieces fill one warp's tensor-core tiles, and more warps
    # only add layout exchanges (B1 T32K on an H200 with TF32 products: 4 warps 716 us, 2 417,
    # 1 220)
    warps_intra: int = 1
    warps_group: int = 8
    warps_wy: int = 4
    stages_seq: int = 3
    fuse_bwd: bool = False  # dq/dk and WY in one value-head kernel (not yet timed on a GPU)
    warps_fused: int = 4
    dqk_hv: bool = True  # dq/dk kernel on a value-head grid (dq, dk summed by XLA)
    wy_hv: bool = True  # WY backward on a value-head grid (dk summed by XLA)
    dvl_in_state: bool = True  # chunk-local dv inside the reverse state pass
    split_intra: bool = True  # intra as an inverse kernel + whole-chunk W, U kernel
    gates_kernel: bool = True  # gamma/beta by _gates_kernel (where HV allows) instead of XLA
    save_tinv: bool = True  # keep the forward's (I + A)^-1 for the backward (as fla keeps A)
    inv_power: bool = True  # diagonal blocks of the inverse by repeated squaring, not rows
    # fp32 products of the inverse: "ieee" (FMA units), "tf32" (one TF32 tensor-core pass, as
    # fla runs its inverse on Hopper: ~1e-3 relative, below the bf16 the inverse is stored in;
    # the bench's check against the fp32 reference read the same errors as with "ieee") or
    # "tf32x3" (three passes, about fp32 accuracy); compiled kernels only, interpret mode always
    # runs IEEE. B1 T32K on an H200, 2 warps: ieee 518 us, tf32 417
    inv_dot: str = "tf32"
    solve_hv: bool = True  # inverse kernel on a value-head grid (k k^T computed per value head)
    # dtype of the per-value-head dq, dk partials of the value-head grids, summed in fp32 by
    # XLA: "auto" is the storage dtype (bf16 partials halve that round trip's bytes)
    partials: str = "auto"
    # the WY backward's steps reordered so few [C, 128] fp32 tiles are live at once (sm_90a
    # compile: 20 B of spills per thread instead of 1244; B1 T32K on an H200: 1.49 -> 0.90 ms)
    wy_compact: bool = True
    # sequence groups of the state passes: 1 = one sequential pass over all chunks; G > 1 splits
    # the chunks into G groups run in parallel (each group's end state from zero and its
    # [K, K] transition, a G-step combine, then every group from its true start state: about 3x
    # the pass's work over G times the programs). One group by default: on an H200 the split
    # lost wherever it was timed, even with a value-block grid under half the multiprocessors
    # (HV 16, B1: T32K fwd+bwd 4.29 -> 4.55 ms with 4 groups, T8K 1.21 -> 1.34; Qwen3-Next
    # heads, B1 T32K, 2 groups: 6.69 -> 8.83 ms).
    seq_groups: int = 1

    def __post_init__(self):
        if self.seq_groups < 1 or self.N % self.seq_groups:
            raise ValueError(
                f"seq_groups={self.seq_groups} must be a positive divisor of the {self.N} chunks "
                "of the sequence."
            )

    @property
    def R(self):
        return self.HV // self.H

    @property
    def N(self):
        return self.Tp // self.C

    @property
    def BV(self):
        return min(self.V, self.bv_par)

    @property
    def BVQ(self):
        return min(self.V, self.bv_dqk)

    @property
    def _wide_seq(self):
        return self.B * self.HV * max(1, self.V // 64) >= self.num_sms

    @property
    def BVS(self):
        return min(self.V, self.bv_seq or (64 if self._wide_seq else 32))

    @property
    def G(self):
        """Sequence groups of the state passes (see seq_groups); always divides N."""
        return self.seq_groups

    @property
    def WS(self):
        return self.warps_seq or 4

    @property
    def WSB(self):
        return self.warps_seq_bwd or self.warps_seq or (8 if self.BVS >= 64 else 4)

    @property
    def sub(self):
        return min(_SUB, self.C)

    @property
    def dtype(self):
        return jnp.dtype(self.store)

    @property
    def partial_dtype(self):
        return self.dtype if self.partials == "auto" else jnp.dtype(self.partials)

    @property
    def inv_precision(self):
        presets = {
            "ieee": None,
            "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
            "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
        }
        if self.inv_dot not in presets:
            raise ValueError(f"inv_dot must be one of {sorted(presets)}, got {self.inv_dot!r}.")
        return None if self.interpret else presets[self.inv_dot]


# --------------------------------------------------------------------------------------------
# In-kernel helpers (operate on loaded values)
# --------------------------------------------------------------------------------------------


def _mm(a, b, dtype, *, ta=False, tb=False, f32=None):
    """a @ b (optionally transposed operands) with fp32 accumulation.

    Operands are cast to dtype: 16-bit runs on tensor cores, float32 runs at HIGHEST (IEEE) or
    at the precision f32 given (a lax precision or dot algorithm preset).
    """
    if dtype == _F32:
        prec = jax.lax.Precision.HIGHEST if f32 is None else f32
    else:
        prec = jax.lax.Precision.DEFAULT
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(
        a.astype(dtype), b.astype(dtype), dims, precision=prec, preferred_element_type=_F32
    )


def _iota(shape, dim):
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _last(x_C):
    """x[-1] of a vector, as a masked sum (Triton values cannot be indexed)."""
    return jnp.sum(jnp.where(_iota(x_C.shape, 0) == x_C.shape[0] - 1, x_C, 0.0))


def _masked_exp(mask, x):
    """exp(x) where mask else 0, never exponentiating a masked entry (no inf, no NaN grads)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _chunk_gates(gamma_C, seg_C):
    """Per-chunk gate factors.

    Returns L_CC (decay e^(gamma_r - gamma_s) on same-document pairs s <= r), gexp_C (e^gamma on
    the chunk's first document, where the carried-in state reaches), kdec_C (e^(gamma_last -
    gamma) on the last document, what survives to the chunk end) and passes (e^gamma_last if
    the carried-in state survives the chunk, else 0).
    """
    C = gamma_C.shape[0]
    mask = (seg_C[:, None] == seg_C[None, :]) & (_iota((C, C), 0) >= _iota((C, C), 1))
    L_CC = _masked_exp(mask, gamma_C[:, None] - gamma_C[None, :])
    gexp_C = _masked_exp(seg_C == 0, gamma_C)
    seg_last = jnp.max(seg_C)
    gamma_last = _last(gamma_C)
    kdec_C = _masked_exp(seg_C == seg_last, gamma_last - gamma_C)
    passes = jnp.where(seg_last == 0, jnp.exp(gamma_last), 0.0)
    return L_CC, gexp_C, kdec_C, passes


def _unit_lower_inverse(X_nn, f32=None):
    """(I - X)^-1 = (I + X)(I + X^2)(I + X^4)... for strictly lower X (nilpotent: X^n = 0).

    log2(n) - 1 squarings and as many products, fp32 at HIGHEST: a short chain of small dots
    instead of n - 2 dependent row steps, each with two cross-thread reductions.
    """
    n = X_nn.shape[0]
    P_nn, Xp_nn, p = (_iota((n, n), 0) == _iota((n, n), 1)).astype(_F32) + X_nn, X_nn, 1
    while 2 * p < n:
        Xp_nn = _mm(Xp_nn, Xp_nn, _F32, f32=f32)
        P_nn = P_nn + _mm(P_nn, Xp_nn, _F32, f32=f32)
        p *= 2
    return P_nn


def _wy_blocks(k_blocks, g_blocks, b_blocks, s_blocks, kk, dtype, power=False, f32=None):
    """Sub-blocked A = strict-lower(beta_r (k_r . k_s) L_rs) and its unit-lower inverse.

    kk: dict (i, j) -> k_i k_j^T (i >= j), shared by the value heads of a key head. power:
    diagonal blocks by _unit_lower_inverse instead of row-by-row forward substitution; f32:
    precision of the inverse's fp32 products (None: IEEE).
    Returns dicts over i >= j of L blocks (the decay mask of A), A blocks and Tinv = (I + A)^-1
    blocks, all fp32.
    """
    del k_blocks, dtype
    nb = len(g_blocks)
    n = g_blocks[0].shape[0]
    rows, cols = _iota((n, n), 0), _iota((n, n), 1)
    L, A = {}, {}
    for i in range(nb):
        for j in range(i + 1):
            mask = s_blocks[i][:, None] == s_blocks[j][None, :]
            if i == j:
                mask = mask & (rows > cols)
            L[i, j] = _masked_exp(mask, g_blocks[i][:, None] - g_blocks[j][None, :])
            A[i, j] = b_blocks[i][:, None] * kk[i, j] * L[i, j]
    # Forward substitution in all diagonal blocks at once, row by row: row r of (Tinv - I) is
    # a_r + a_r @ (Tinv - I) with a_r = -A[r, :r]; rows above r are final, rows below still
    # hold -A and are not read (a_r is zero there). Rows 0 and 1 are final from the start. A
    # loop, not unrolled code: it keeps the Triton compile short.
    negs = tuple(-A[i, i] for i in range(nb))

    def substitute(r, xs):
        out = []
        for neg, x in zip(negs, xs, strict=True):
            a_r = jnp.sum(jnp.where(rows == r, neg, 0.0), axis=0)
            a_r = a_r + jnp.sum(a_r[:, None] * x, axis=0)
            out.append(jnp.where(rows == r, a_r[None, :], x))
        return tuple(out)

    eye = (rows == cols).astype(_F32)
    if power:
        Ti = {(i, i): _unit_lower_inverse(negs[i], f32) for i in range(nb)}
    else:
        xs = jax.lax.fori_loop(2, n, substitute, negs) if n > 2 else negs
        Ti = {(i, i): xs[i] + eye for i in range(nb)}
    for i in range(nb):
        for j in range(i - 1, -1, -1):
            acc = _mm(A[i, j], Ti[j, j], _F32, f32=f32)
            for m in range(j + 1, i):
                acc = acc + _mm(A[i, m], Ti[m, j], _F32, f32=f32)
            Ti[i, j] = -_mm(Ti[i, i], acc, _F32, f32=f32)
    return L, A, Ti


def _kk_blocks(k_blocks, dtype):
    return {
        (i, j): _mm(k_blocks[i], k_blocks[j], dtype, tb=True)
        for i in range(len(k_blocks))
        for j in range(i + 1)
    }


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _same_doc_prefix(seg_C, C):
    """M[r, s] = 1 where s <= r in the same document of the chunk (segmented cumsum matrix)."""
    mask = (seg_C[:, None] == seg_C[None, :]) & (_iota((C, C), 0) >= _iota((C, C), 1))
    return mask.astype(_F32)


def _gates_kernel(g_ref, b_ref, s_ref, gam_ref, bt_ref, *, cfg):
    """One chunk, all value heads: gamma = chunk-local cumsum of g restarting at document
    starts, and beta, both transposed from [C, HV] to [HV, C]."""
    M_CC = _same_doc_prefix(s_ref[...], cfg.C)
    # gamma[h, r] = sum_s g[s, h] M[r, s]; exact fp32 products (zeros add nothing).
    gam_ref[...] = _mm(g_ref[...], M_CC, _F32, ta=True, tb=True)
    bt_ref[...] = b_ref[...].T


def _gates_bwd_kernel(dgam_ref, dbt_ref, s_ref, dg_ref, db_ref, *, cfg):
    M_CC = _same_doc_prefix(s_ref[...], cfg.C)
    # dg[s, h] = sum_r M[r, s] dgamma[h, r]
    dg_ref[...] = _mm(M_CC, dgam_ref[...], _F32, ta=True, tb=True)
    db_ref[...] = dbt_ref[...].T


def _key_head_blocks(k_ref, s_ref, cfg):
    """Per-chunk prologue shared by the intra kernels: sub-block size n, count nb, dtype, the
    row-block slicer, k and segment blocks, and the decay-free k kᵀ blocks."""
    n, nb, dt = cfg.sub, cfg.C // cfg.sub, cfg.dtype
    blk = lambda i: pl.ds(i * n, n)  # noqa: E731
    k_blocks = [k_ref[blk(i), :] for i in range(nb)]
    s_blocks = [s_ref[blk(i)] for i in range(nb)]
    return n, nb, dt, blk, k_blocks, s_blocks, _kk_blocks(k_blocks, dt)


def _store_inverse(tinv_ref, r, Ti, blk, nb, n):
    """Writes value head r's (I + A)^-1 (r None: the ref's only one) from its lower
    sub-blocks Ti; upper blocks zero."""
    for i in range(nb):
        for j in range(nb):
            blk_ij = Ti[i, j] if j <= i else jnp.zeros((n, n), _F32)
            idx = (blk(i), blk(j)) if r is None else (r, blk(i), blk(j))
            tinv_ref[idx] = blk_ij.astype(tinv_ref.dtype)


def _intra_kernel(k_ref, v_ref, g_ref, b_ref, s_ref, w_ref, u_ref, *tinv_refs, cfg):
    """One chunk of one key head: W, U for its R value heads (refs [C,K], [C,R,V], [R,C]).

    With a third output ref ([R,C,C], the backward's call) it also writes the full (I + A)^-1
    of every value head, upper blocks zero, for the WY backward's 64-row products (in the
    storage dtype: every product casts it to that anyway).
    """
    n, nb, dt, blk, k_blocks, s_blocks, kk = _key_head_blocks(k_ref, s_ref, cfg)
    for r in range(cfg.R):
        g_blocks = [g_ref[r, blk(i)] for i in range(nb)]
        b_blocks = [b_ref[r, blk(i)] for i in range(nb)]
        _, _, Ti = _wy_blocks(
            k_blocks, g_blocks, b_blocks, s_blocks, kk, dt, cfg.inv_power, cfg.inv_precision
        )
        if tinv_refs:
            _store_inverse(tinv_refs[0], r, Ti, blk, nb, n)
        vb = [b_blocks[i][:, None] * v_ref[blk(i), r, :].astype(_F32) for i in range(nb)]
        kbg = [
            (b_blocks[i] * _masked_exp(s_blocks[i] == 0, g_blocks[i]))[:, None]
            * k_blocks[i].astype(_F32)
            for i in range(nb)
        ]
        for i in range(nb):
            u = sum(_mm(Ti[i, j], vb[j], dt) for j in range(i + 1))
            w = sum(_mm(Ti[i, j], kbg[j], dt) for j in range(i + 1))
            u_ref[blk(i), r, :] = u.astype(u_ref.dtype)
            w_ref[blk(i), r, :] = w.astype(w_ref.dtype)


def _solve_kernel(k_ref, g_ref, b_ref, s_ref, tinv_ref, *, cfg):
    """One chunk of one key head: (I + A)^-1 of its R value heads ([R,C,C], upper blocks 0).

    With cfg.solve_hv, one value head (refs g, b [C], tinv [C,C]; k of its key head)."""
    n, nb, dt, blk, k_blocks, s_blocks, kk = _key_head_blocks(k_ref, s_ref, cfg)
    for r in [None] if cfg.solve_hv else range(cfg.R):
        at = (lambda i: blk(i)) if r is None else (lambda i, r=r: (r, blk(i)))  # noqa: E731
        g_blocks = [g_ref[at(i)] for i in range(nb)]
        b_blocks = [b_ref[at(i)] for i in range(nb)]
        _, _, Ti = _wy_blocks(
            k_blocks, g_blocks, b_blocks, s_blocks, kk, dt, cfg.inv_power, cfg.inv_precision
        )
        _store_inverse(tinv_ref, r, Ti, blk, nb, n)


def _wu_kernel(k_ref, v_ref, g_ref, b_ref, s_ref, tinv_ref, w_ref, u_ref, *, cfg):
    """One chunk of one value head: W, U as whole-chunk products with the stored inverse."""
    dt = cfg.dtype
    Ti_CC, b_C = tinv_ref[...], b_ref[...]
    bg_C = b_C * _masked_exp(s_ref[...] == 0, g_ref[...])
    u_ref[...] = _mm(Ti_CC, b_C[:, None] * v_ref[...].astype(_F32), dt).astype(u_ref.dtype)
    w_ref[...] = _mm(Ti_CC, bg_C[:, None] * k_ref[...].astype(_F32), dt).astype(w_ref.dtype)


def _fwd_chunk(cfg, w_ref, k_ref, g_ref, s_ref, rows, S_KV, u_ref=None, vn_ref=None):
    """One chunk of the forward recurrence from state S_KV ([K, BV] f32) -> the next state
    passes * S + k^T (kdec . v_new), with v_new = U - W S (stored to vn_ref if given). Without
    u_ref (a group's transition, the recurrence's linear part) v_new = -W S."""
    dt = cfg.dtype
    _, _, kdec_C, passes = _chunk_gates(g_ref[rows], s_ref[rows])
    if u_ref is None:
        vn_CV = -_mm(w_ref[rows, :], S_KV, dt)
    else:
        vn_CV = u_ref[rows, :].astype(_F32) - _mm(w_ref[rows, :], S_KV, dt)
    if vn_ref is not None:
        vn_ref[rows, :] = vn_CV.astype(vn_ref.dtype)
    # the decay on the [C, BV] side, so k goes from memory straight to the product (scaling k
    # first cost 0.77 against 0.65 ms at B1 T32K on an H200)
    return passes * S_KV + _mm(k_ref[rows, :], kdec_C[:, None] * vn_CV, dt, ta=True)


def _identity_cols(K, bw):
    """[K, bw] f32: the columns of the K x K identity in this program's column block (grid axis
    3), the start of a sequence group's transition."""
    return (_iota((K, bw), 0) == _iota((K, bw), 1) + pl.program_id(3) * bw).astype(_F32)


def _state_fwd_kernel(
    w_ref, u_ref, k_ref, g_ref, s_ref, s0_ref, states_ref, vn_ref, final_ref, *, cfg
):
    """Sequential pass for one value head and one V block over the whole sequence or one
    sequence group (the refs' rows)."""
    C, K = cfg.C, cfg.K

    def body(n, S_KV):
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        states_ref[pl.ds(pl.multiple_of(n * K, K), K), :] = S_KV.astype(states_ref.dtype)
        return _fwd_chunk(cfg, w_ref, k_ref, g_ref, s_ref, rows, S_KV, u_ref, vn_ref)

    final_ref[...] = jax.lax.fori_loop(0, g_ref.shape[0] // C, body, s0_ref[...].astype(_F32))


def _state_end_kernel(w_ref, k_ref, g_ref, s_ref, *refs, cfg):
    """One sequence group's forward pass, end state only, for the split (cfg.G > 1).

    refs (u_ref, end_ref): the end state from a zero start ([K, BV]); (end_ref,): the group's
    transition, the same recurrence without u from the identity ([K, BK], columns of I), so
    that end(S0) = transition @ S0 + end(0)."""
    C, K = cfg.C, cfg.K
    u_ref, end_ref = refs if len(refs) == 2 else (None, refs[0])
    bw = end_ref.shape[1]
    S0 = _identity_cols(K, bw) if u_ref is None else jnp.zeros((K, bw), _F32)

    def body(n, S_KV):
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        return _fwd_chunk(cfg, w_ref, k_ref, g_ref, s_ref, rows, S_KV, u_ref)

    end_ref[...] = jax.lax.fori_loop(0, g_ref.shape[0] // C, body, S0)


def _output_kernel(q_ref, k_ref, st_ref, vn_ref, g_ref, s_ref, o_ref, *, cfg):
    dt = cfg.dtype
    q_CK = q_ref[...]
    L_CC, gexp_C, _, _ = _chunk_gates(g_ref[...], s_ref[...])
    aqk_CC = _mm(q_CK, k_ref[...], dt, tb=True) * L_CC
    o_CV = gexp_C[:, None] * _mm(q_CK, st_ref[...], dt) + _mm(aqk_CC, vn_ref[...], dt)
    o_ref[...] = (cfg.scale * o_CV).astype(o_ref.dtype)


def _vn_kernel(w_ref, u_ref, st_ref, vn_ref, *, cfg):
    vn_CV = u_ref[...].astype(_F32) - _mm(w_ref[...], st_ref[...], cfg.dtype)
    vn_ref[...] = vn_CV.astype(vn_ref.dtype)


def _dv_local_kernel(
    q_ref, k_ref, w_ref, u_ref, st_ref, g_ref, s_ref, do_ref, vn_ref, dvl_ref, *, cfg
):
    dt = cfg.dtype
    _vn_kernel(w_ref, u_ref, st_ref, vn_ref, cfg=cfg)
    L_CC, _, _, _ = _chunk_gates(g_ref[...], s_ref[...])
    aqk_CC = _mm(q_ref[...], k_ref[...], dt, tb=True) * L_CC
    dvl_ref[...] = (cfg.scale * _mm(aqk_CC, do_ref[...], dt, ta=True)).astype(dvl_ref.dtype)


def _bwd_chunk(
    cfg, q_ref, k_ref, w_ref, g_ref, s_ref, rows, dS_KV, do_ref=None, dvl_ref=None, dvn_ref=None
):
    """One chunk of the reverse recurrence from dS_KV (the cotangent of the state after the
    chunk, [K, BV] f32) -> the cotangent of the state before it; dv_new is stored to dvn_ref if
    given. Without do_ref (a group's reverse transition) the output's terms are left out; with
    do_ref and no dvl_ref the chunk-local dv = scale (q k^T . L)^T do is computed here, off the
    chain of dependent products the pass waits on. The gates go on the [C, BV] operands and
    results, not on q and k, which thus go from memory straight to the products (1.96 -> 1.11 ms
    at B1 T32K on an H200)."""
    dt = cfg.dtype
    L_CC, gexp_C, kdec_C, passes = _chunk_gates(g_ref[rows], s_ref[rows])
    if do_ref is None:
        dvn_CV = kdec_C[:, None] * _mm(k_ref[rows, :], dS_KV, dt)
        read_KV = None
    else:
        k_CK, q_CK, do_CV = k_ref[rows, :], q_ref[rows, :], do_ref[rows, :]
        if dvl_ref is None:
            aqk_CC = _mm(q_CK, k_CK, dt, tb=True) * L_CC
            dvl_CV = cfg.scale * _mm(aqk_CC, do_CV, dt, ta=True)
        else:
            dvl_CV = dvl_ref[rows, :]
        dvn_CV = dvl_CV + kdec_C[:, None] * _mm(k_CK, dS_KV, dt)
        dod_CV = do_CV.astype(_F32) * (cfg.scale * gexp_C)[:, None]
        read_KV = _mm(q_CK, dod_CV, dt, ta=True)
    if dvn_ref is not None:
        # every product that reads dv_new casts it to the storage dtype: store it so
        dvn_ref[rows, :] = dvn_CV.astype(dvn_ref.dtype)
    carried_KV = passes * dS_KV if read_KV is None else passes * dS_KV + read_KV
    return carried_KV - _mm(w_ref[rows, :], dvn_CV, dt, ta=True)


def _state_bwd_kernel(q_ref, k_ref, w_ref, g_ref, s_ref, do_ref, *refs, cfg):
    """Reverse pass for one value head and one V block (over the whole sequence or one sequence
    group): dS_KV is d(state after chunk n).

    refs: (dvl_ref,) dfin_ref, dst_ref, dvn_ref, ds0_ref; with cfg.dvl_in_state there is no
    dvl_ref (_bwd_chunk computes the chunk-local dv). (v_new recomputed in this loop instead of
    its own kernel was slower: 2.06 ms with 2 pipeline stages, and 3 no longer fit in shared
    memory.)
    """
    C, K, N = cfg.C, cfg.K, g_ref.shape[0] // cfg.C  # N: this pass's chunks
    if cfg.dvl_in_state:
        dvl_ref, (dfin_ref, dst_ref, dvn_ref, ds0_ref) = None, refs
    else:
        dvl_ref, dfin_ref, dst_ref, dvn_ref, ds0_ref = refs

    def body(i, dS_KV):
        n = N - 1 - i
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        dst_ref[pl.ds(pl.multiple_of(n * K, K), K), :] = dS_KV.astype(dst_ref.dtype)
        return _bwd_chunk(
            cfg, q_ref, k_ref, w_ref, g_ref, s_ref, rows, dS_KV, do_ref, dvl_ref, dvn_ref
        )

    ds0_ref[...] = jax.lax.fori_loop(0, N, body, dfin_ref[...].astype(_F32))


def _state_bwd_end_kernel(q_ref, k_ref, w_ref, g_ref, s_ref, *refs, cfg):
    """One sequence group's reverse pass, start cotangent only, for the split (cfg.G > 1).

    refs (do_ref, [dvl_ref,] ds0_ref): from a zero cotangent at the group's end, with the
    output's sources; (ds0_ref,): the group's reverse transition, the recurrence without sources
    from the identity, so that start(dS_end) = transition @ dS_end + start(0)."""
    C, K = cfg.C, cfg.K
    *src, ds0_ref = refs
    do_ref, dvl_ref = (src + [None, None])[:2]
    bw = ds0_ref.shape[1]
    dS0 = jnp.zeros((K, bw), _F32) if src else _identity_cols(K, bw)
    n_chunks = g_ref.shape[0] // C

    def body(i, dS_KV):
        rows = pl.ds(pl.multiple_of((n_chunks - 1 - i) * C, C), C)
        return _bwd_chunk(cfg, q_ref, k_ref, w_ref, g_ref, s_ref, rows, dS_KV, do_ref, dvl_ref)

    ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dS0)


def _dqk_kernel(
    q_ref, k_ref, g_ref, s_ref, st_ref, dst_ref, vn_ref, do_ref, dq_ref, dk_ref, dg_ref, *, cfg
):
    """Gradients through the read-out and the chunk-end state, for one key head's group.

    The value dimension is walked in blocks of cfg.BVQ columns (states [K, BVQ] at a time).
    """
    C, K, dt, scale = cfg.C, cfg.K, cfg.dtype, cfg.scale
    BVQ = cfg.BVQ
    q_CK, k_CK = q_ref[...], k_ref[...]
    q32, k32 = q_CK.astype(_F32), k_CK.astype(_F32)
    seg_C = s_ref[...]
    qk_CC = _mm(q_CK, k_CK, dt, tb=True)
    dq_CK = jnp.zeros((C, K), _F32)
    dk_CK = jnp.zeros((C, K), _F32)
    at_last = _iota((C,), 0) == C - 1
    for r in range(1 if cfg.dqk_hv else cfg.R):
        gamma_C = g_ref[r, :]
        L_CC, gexp_C, kdec_C, passes = _chunk_gates(gamma_C, seg_C)
        dos_CK = jnp.zeros((C, K), _F32)
        vds_CK = jnp.zeros((C, K), _F32)
        dov_CC = jnp.zeros((C, C), _F32)
        sds = jnp.zeros((), _F32)
        for iv in range(cfg.V // BVQ):
            cols = pl.ds(iv * BVQ, BVQ)
            S_KV, dS_KV = st_ref[r, :, cols], dst_ref[r, :, cols]
            vn_CV, do_CV = vn_ref[:, r, cols], do_ref[:, r, cols]
            dos_CK = dos_CK + _mm(do_CV, S_KV, dt, tb=True)
            dov_CC = dov_CC + _mm(do_CV, vn_CV, dt, tb=True)
            vds_CK = vds_CK + _mm(vn_CV, dS_KV, dt, tb=True)
            sds = sds + jnp.sum(S_KV.astype(_F32) * dS_KV.astype(_F32))
        dqk_CC = scale * dov_CC * L_CC  # cotangent of the entries of q k^T
        dq_CK = dq_CK + (scale * gexp_C)[:, None] * dos_CK + _mm(dqk_CC, k_CK, dt)
        dk_CK = dk_CK + _mm(dqk_CC, q_CK, dt, ta=True) + kdec_C[:, None] * vds_CK
        # gamma enters through L (row +, column -), the read-out of S, and the decays to the
        # chunk end (kdec: -gamma_r, +gamma_last; passes: +gamma_last).
        P_CC = dqk_CC * qk_CC
        t_C = kdec_C * jnp.sum(k32 * vds_CK, axis=1)
        d_last = jnp.sum(t_C) + passes * sds
        dg_C = (
            jnp.sum(P_CC, axis=1)
            - jnp.sum(P_CC, axis=0)
            + scale * gexp_C * jnp.sum(dos_CK * q32, axis=1)
            - t_C
            + jnp.where(at_last, d_last, 0.0)
        )
        dg_ref[r, :] = dg_C
    dq_ref[...] = dq_CK.astype(dq_ref.dtype)
    dk_ref[...] = dk_CK.astype(dk_ref.dtype)


def _wy_bwd_kernel(
    k_ref,
    v_ref,
    g_ref,
    b_ref,
    s_ref,
    w_ref,
    u_ref,
    tinv_ref,
    st_ref,
    dvn_ref,
    dk_ref,
    dv_ref,
    db_ref,
    dg_ref,
    *,
    cfg,
):
    """Gradients through W = Tinv (beta e^gamma k), U = Tinv (beta v) and A, per key head.

    Tinv = (I + A)^-1 comes from the backward's intra kernel ([R, C, C] fp32), so every product
    here is a whole-chunk (C-row) tensor-core product.
    """
    C, dt = cfg.C, cfg.dtype
    k_CK = k_ref[...]
    # (wy_compact forms these where they are used, per value head)
    k32 = None if cfg.wy_compact else k_CK.astype(_F32)
    seg_C = s_ref[...]
    kk_CC = None if cfg.wy_compact else _mm(k_CK, k_CK, dt, tb=True)
    rows, cols = _iota((C, C), 0), _iota((C, C), 1)
    strict = (seg_C[:, None] == seg_C[None, :]) & (rows > cols)
    dk_CK = jnp.zeros((C, cfg.K), _F32)
    for r in range(1 if cfg.wy_hv else cfg.R):
        g_C, b_C = g_ref[r, :], b_ref[r, :]
        if not cfg.wy_compact:
            L_CC = _masked_exp(strict, g_C[:, None] - g_C[None, :])
            kkL_CC = kk_CC * L_CC
        Ti_CC = tinv_ref[r, :, :]
        if cfg.wy_compact:
            # The products below in an order that uses each [C, 128] fp32 tile up soon after it
            # is made (dv, its share of dbeta and of dA before dKbg exists): few live at once.
            gexp_C = _masked_exp(seg_C == 0, g_C)
            dU_CV = dvn_ref[:, r, :]
            dvb_CV = _mm(Ti_CC, dU_CV, dt, ta=True)
            dv_ref[:, r, :] = (b_C[:, None] * dvb_CV).astype(dv_ref.dtype)
            db_v = jnp.sum(dvb_CV * v_ref[:, r, :].astype(_F32), axis=1)
            dA_CC = -_mm(dvb_CV, u_ref[:, r, :], dt, tb=True)
            dkbg_CK = _mm(Ti_CC, -_mm(dU_CV, st_ref[r, :, :], dt, tb=True), dt, ta=True)
            dA_CC = dA_CC - _mm(dkbg_CK, w_ref[:, r, :], dt, tb=True)
            kg_sum = gexp_C * jnp.sum(dkbg_CK * k_CK.astype(_F32), axis=1)  # sum(dkbg e^gamma k)
            dk_CK = dk_CK + (b_C * gexp_C)[:, None] * dkbg_CK
            L_CC = _masked_exp(strict, g_C[:, None] - g_C[None, :])
            dAkkL_CC = dA_CC * _mm(k_CK, k_CK, dt, tb=True) * L_CC
            dKK_CC = dA_CC * b_C[:, None] * L_CC
            dk_CK = dk_CK + _mm(dKK_CC, k_CK, dt) + _mm(dKK_CC, k_CK, dt, ta=True)
            P_CC = dAkkL_CC * b_C[:, None]  # dA * A
            db_ref[r, :] = jnp.sum(dAkkL_CC, axis=1) + db_v + kg_sum
            dg_ref[r, :] = jnp.sum(P_CC, axis=1) - jnp.sum(P_CC, axis=0) + b_C * kg_sum
            continue
        dU_CV = dvn_ref[:, r, :]
        dW_CK = -_mm(dU_CV, st_ref[r, :, :], dt, tb=True)
        # d(rhs) = Tinv^T d(solution)
        dvb_CV = _mm(Ti_CC, dU_CV, dt, ta=True)
        dkbg_CK = _mm(Ti_CC, dW_CK, dt, ta=True)
        # dA = -(dVb U^T + dKbg W^T); entries outside A's pattern meet L = 0 below. (fla's form
        # -Tinv^T (dU Vb^T + dW Kbg^T) Tinv^T reads neither U nor W, but took 16% longer end to
        # end on an H200: option wy_from_inputs of commit 33cde49, RESULTS.md session 5.)
        dA_CC = -(
            _mm(dvb_CV, u_ref[:, r, :], dt, tb=True) + _mm(dkbg_CK, w_ref[:, r, :], dt, tb=True)
        )
        dAkkL_CC = dA_CC * kkL_CC
        dKK_CC = dA_CC * b_C[:, None] * L_CC
        dk_CK = dk_CK + _mm(dKK_CC, k_CK, dt) + _mm(dKK_CC, k_CK, dt, ta=True)
        P_CC = dAkkL_CC * b_C[:, None]  # dA * A
        gexp_C = _masked_exp(seg_C == 0, g_C)
        kg_sum = gexp_C * jnp.sum(dkbg_CK * k32, axis=1)  # sum(dkbg * e^gamma k)
        dk_CK = dk_CK + (b_C * gexp_C)[:, None] * dkbg_CK
        v32 = v_ref[:, r, :].astype(_F32)
        dv_ref[:, r, :] = (b_C[:, None] * dvb_CV).astype(dv_ref.dtype)
        db_ref[r, :] = jnp.sum(dAkkL_CC, axis=1) + jnp.sum(dvb_CV * v32, axis=1) + kg_sum
        dg_ref[r, :] = jnp.sum(P_CC, axis=1) - jnp.sum(P_CC, axis=0) + b_C * kg_sum
    dk_ref[...] = dk_CK.astype(dk_ref.dtype)


def _bwd_fused_kernel(
    q_ref,
    k_ref,
    v_ref,
    g_ref,
    b_ref,
    s_ref,
    w_ref,
    u_ref,
    tinv_ref,
    st_ref,
    dst_ref,
    vn_ref,
    do_ref,
    dvn_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    db_ref,
    dg_ref,
    *,
    cfg,
):
    """_dqk_kernel and _wy_bwd_kernel in one program per value head and chunk (cfg.fuse_bwd):
    k, S, the gates and the decay matrix are loaded / built once, dk and dgamma leave once."""
    C, dt, scale = cfg.C, cfg.dtype, cfg.scale
    q_CK, k_CK = q_ref[...], k_ref[...]
    q32, k32 = q_CK.astype(_F32), k_CK.astype(_F32)
    seg_C, g_C, b_C = s_ref[...], g_ref[0, :], b_ref[0, :]
    L_CC, gexp_C, kdec_C, passes = _chunk_gates(g_C, seg_C)
    S_KV, dS_KV = st_ref[0, :, :], dst_ref[0, :, :]
    vn_CV, do_CV = vn_ref[:, 0, :], do_ref[:, 0, :]
    # Read-out and chunk-end state (as _dqk_kernel).
    qk_CC = _mm(q_CK, k_CK, dt, tb=True)
    dos_CK = _mm(do_CV, S_KV, dt, tb=True)
    vds_CK = _mm(vn_CV, dS_KV, dt, tb=True)
    dqk_CC = scale * _mm(do_CV, vn_CV, dt, tb=True) * L_CC
    dq_CK = (scale * gexp_C)[:, None] * dos_CK + _mm(dqk_CC, k_CK, dt)
    dk_CK = _mm(dqk_CC, q_CK, dt, ta=True) + kdec_C[:, None] * vds_CK
    P_CC = dqk_CC * qk_CC
    t_C = kdec_C * jnp.sum(k32 * vds_CK, axis=1)
    d_last = jnp.sum(t_C) + passes * jnp.sum(S_KV.astype(_F32) * dS_KV.astype(_F32))
    at_last = _iota((C,), 0) == C - 1
    dg_C = (
        jnp.sum(P_CC, axis=1)
        - jnp.sum(P_CC, axis=0)
        + scale * gexp_C * jnp.sum(dos_CK * q32, axis=1)
        - t_C
        + jnp.where(at_last, d_last, 0.0)
    )
    # Through W, U and A (as _wy_bwd_kernel); A's decay is L without its diagonal.
    Ls_CC = jnp.where(_iota((C, C), 0) > _iota((C, C), 1), L_CC, 0.0)
    kkL_CC = _mm(k_CK, k_CK, dt, tb=True) * Ls_CC
    Ti_CC = tinv_ref[0, :, :]
    dU_CV = dvn_ref[:, 0, :]
    dW_CK = -_mm(dU_CV, S_KV, dt, tb=True)
    dvb_CV = _mm(Ti_CC, dU_CV, dt, ta=True)
    dkbg_CK = _mm(Ti_CC, dW_CK, dt, ta=True)
    dA_CC = -(_mm(dvb_CV, u_ref[:, 0, :], dt, tb=True) + _mm(dkbg_CK, w_ref[:, 0, :], dt, tb=True))
    dAkkL_CC = dA_CC * kkL_CC
    dKK_CC = dA_CC * b_C[:, None] * Ls_CC
    P_CC = dAkkL_CC * b_C[:, None]
    kg_sum = gexp_C * jnp.sum(dkbg_CK * k32, axis=1)
    dk_CK = (
        dk_CK
        + _mm(dKK_CC, k_CK, dt)
        + _mm(dKK_CC, k_CK, dt, ta=True)
        + (b_C * gexp_C)[:, None] * dkbg_CK
    )
    v32 = v_ref[:, 0, :].astype(_F32)
    dv_ref[:, 0, :] = (b_C[:, None] * dvb_CV).astype(dv_ref.dtype)
    db_ref[0, :] = jnp.sum(dAkkL_CC, axis=1) + jnp.sum(dvb_CV * v32, axis=1) + kg_sum
    dg_ref[0, :] = dg_C + jnp.sum(P_CC, axis=1) - jnp.sum(P_CC, axis=0) + b_C * kg_sum
    dq_ref[...] = dq_CK.astype(dq_ref.dtype)
    dk_ref[...] = dk_CK.astype(dk_ref.dtype)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers
# --------------------------------------------------------------------------------------------


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, num_warps, num_stages=1):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=kernel.__name__.strip("_"),
    )


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _gates_call(cfg, kernel, a, b, seg, transpose_in):
    B, Tp, HV, C = cfg.B, cfg.Tp, cfg.HV, cfg.C
    spec = pl.BlockSpec
    t_spec = spec((None, C, HV), lambda b, n: (b, n, 0))  # [B, Tp, HV]
    h_spec = spec((None, HV, C), lambda b, n: (b, 0, n))  # [B, HV, Tp]
    in_spec, out_spec = (h_spec, t_spec) if transpose_in else (t_spec, h_spec)
    out_shape = (B, Tp, HV) if transpose_in else (B, HV, Tp)
    return _call(
        kernel,
        cfg,
        (B, cfg.N),
        [in_spec, in_spec, spec((None, C), lambda b, n: (b, n))],
        [out_spec, out_spec],
        [_sds(out_shape, _F32), _sds(out_shape, _F32)],
        num_warps=4,
    )(a, b, seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gates(cfg, g, beta, seg):
    """(g, beta [B,Tp,HV] f32, seg [B,Tp]) -> (gamma, beta) [B,HV,Tp] f32 (one small kernel)."""
    return tuple(_gates_call(cfg, _gates_kernel, g, beta, seg, False))


def _gates_fwd(cfg, g, beta, seg):
    return _gates(cfg, g, beta, seg), seg


def _gates_bwd(cfg, seg, cts):
    dgamma, dbeta = cts
    dg, db = _gates_call(cfg, _gates_bwd_kernel, dgamma, dbeta, seg, True)
    return dg, db, None


_gates.defvjp(_gates_fwd, _gates_bwd)


def _solve(cfg, k, gamma, beta, seg):
    B, Tp, HV, K, C, R = cfg.B, cfg.Tp, cfg.HV, cfg.K, cfg.C, cfg.R
    spec = pl.BlockSpec
    # key-head grid (R value heads a program) or, solve_hv, value-head grid
    nr, kh = (None, lambda j: j // R) if cfg.solve_hv else (R, lambda h: h)
    rc_spec = spec((None, nr, C), lambda b, h, n: (b, h, n))
    return _call(
        _solve_kernel,
        cfg,
        (B, HV if cfg.solve_hv else cfg.H, cfg.N),
        [
            spec((None, C, None, K), lambda b, h, n: (b, n, kh(h), 0)),
            rc_spec,
            rc_spec,
            spec((None, C), lambda b, h, n: (b, n)),
        ],
        spec((None, nr, C, C), lambda b, h, n: (b, h, n, 0)),
        _sds((B, HV, Tp, C), cfg.dtype),
        num_warps=cfg.warps_intra,
    )(k, gamma, beta, seg)


def _wu(cfg, k, v, gamma, beta, seg, tinv):
    B, Tp, HV, K, V, C, R = cfg.B, cfg.Tp, cfg.HV, cfg.K, cfg.V, cfg.C, cfg.R
    spec = pl.BlockSpec
    c_spec = spec((None, None, C), lambda b, j, n: (b, j, n))
    return _call(
        _wu_kernel,
        cfg,
        (B, HV, cfg.N),
        [
            spec((None, C, None, K), lambda b, j, n: (b, n, j // R, 0)),
            spec((None, C, None, V), lambda b, j, n: (b, n, j, 0)),
            c_spec,
            c_spec,
            spec((None, C), lambda b, j, n: (b, n)),
            spec((None, None, C, C), lambda b, j, n: (b, j, n, 0)),
        ],
        [
            spec((None, C, None, K), lambda b, j, n: (b, n, j, 0)),
            spec((None, C, None, V), lambda b, j, n: (b, n, j, 0)),
        ],
        [_sds((B, Tp, HV, K), cfg.dtype), _sds((B, Tp, HV, V), cfg.dtype)],
        num_warps=cfg.warps_par,
    )(k, v, gamma, beta, seg, tinv)


def _intra(cfg, k, v, gamma, beta, seg, with_tinv=False):
    """W, U (and with_tinv the stored inverse): one fused kernel, or with cfg.split_intra the
    inverse kernel then whole-chunk W, U products."""
    if cfg.split_intra:
        tinv = _solve(cfg, k, gamma, beta, seg)
        w, u = _wu(cfg, k, v, gamma, beta, seg, tinv)
        return (w, u, tinv) if with_tinv else (w, u)
    B, Tp, H, HV, K, V, C, R = cfg.B, cfg.Tp, cfg.H, cfg.HV, cfg.K, cfg.V, cfg.C, cfg.R
    spec = pl.BlockSpec
    out_specs = [
        spec((None, C, R, K), lambda b, h, n: (b, n, h, 0)),
        spec((None, C, R, V), lambda b, h, n: (b, n, h, 0)),
    ]
    out_shape = [_sds((B, Tp, HV, K), cfg.dtype), _sds((B, Tp, HV, V), cfg.dtype)]
    if with_tinv:
        out_specs.append(spec((None, R, C, C), lambda b, h, n: (b, h, n, 0)))
        out_shape.append(_sds((B, HV, Tp, C), cfg.dtype))
    return _call(
        _intra_kernel,
        cfg,
        (B, H, cfg.N),
        [
            spec((None, C, None, K), lambda b, h, n: (b, n, h, 0)),
            spec((None, C, R, V), lambda b, h, n: (b, n, h, 0)),
            spec((None, R, C), lambda b, h, n: (b, h, n)),
            spec((None, R, C), lambda b, h, n: (b, h, n)),
            spec((None, C), lambda b, h, n: (b, n)),
        ],
        out_specs,
        out_shape,
        num_warps=cfg.warps_intra,
    )(k, v, gamma, beta, seg)


def _seq_specs(cfg, width=None):
    """Grid (B, G, HV, width / BV) (no G axis when G = 1) and BlockSpec makers over one
    sequence group of the state passes: token rows [B, Tp, heads, cols], gates [B, HV, Tp],
    segments [B, Tp], per-group states [B, G, HV, K, cols] and chunk states [B, HV, N*K, cols].
    """
    width = width or cfg.V
    G, R, BV = cfg.G, cfg.R, min(cfg.BVS, width)
    tg = cfg.Tp // G
    # one group: the grid without the group axis (the launch every benchmark figure was taken
    # with); else program_id(1) is the group and program_id(3) the column block
    grid = (cfg.B, cfg.HV, width // BV) if G == 1 else (cfg.B, G, cfg.HV, width // BV)

    def spec(block, index_map):  # index_map(b, g, j, iv) on either grid
        if G == 1:
            return pl.BlockSpec(block, lambda b, j, iv: index_map(b, 0, j, iv))
        return pl.BlockSpec(block, index_map)

    def rows(cols=None, key_head=False):
        """cols None: the program's BV columns of a value-head array; else all cols columns of
        a value-head (or key_head) array."""
        if cols is None:
            return spec((None, tg, None, BV), lambda b, g, j, iv: (b, g, j, iv))
        if key_head:
            return spec((None, tg, None, cols), lambda b, g, j, iv: (b, g, j // R, 0))
        return spec((None, tg, None, cols), lambda b, g, j, iv: (b, g, j, 0))

    return dict(
        grid=grid,
        rows=rows,
        gates=spec((None, None, tg), lambda b, g, j, iv: (b, j, g)),
        seg=spec((None, tg), lambda b, g, j, iv: (b, g)),
        state=spec((None, None, None, cfg.K, BV), lambda b, g, j, iv: (b, g, j, 0, iv)),
        chunks=spec((None, None, (cfg.N // G) * cfg.K, BV), lambda b, g, j, iv: (b, j, g, iv)),
    )


def _state_fwd(cfg, w, u, k, gamma, seg, state0):
    """Forward state pass -> (chunk-start states [B,HV,N*K,V] in the storage dtype, v_new
    [B,Tp,HV,V], final state [B,HV,K,V] f32). With cfg.G > 1 the chunks run in G parallel
    groups (_state_groups_start gives each group's start state)."""
    B, Tp, HV, K, V, G = cfg.B, cfg.Tp, cfg.HV, cfg.K, cfg.V, cfg.G
    starts = state0[:, None] if G == 1 else _state_groups_start(cfg, w, u, k, gamma, seg, state0)
    sp = _seq_specs(cfg)
    K_rows, V_rows = sp["rows"](K), sp["rows"]()
    states, vn, finals = _call(
        _state_fwd_kernel,
        cfg,
        sp["grid"],
        [K_rows, V_rows, sp["rows"](K, key_head=True), sp["gates"], sp["seg"], sp["state"]],
        [sp["chunks"], V_rows, sp["state"]],
        [
            _sds((B, HV, cfg.N * K, V), cfg.dtype),
            _sds((B, Tp, HV, V), cfg.dtype),
            _sds((B, G, HV, K, V), _F32),
        ],
        num_warps=cfg.WS,
        num_stages=cfg.stages_seq,
    )(w, u, k, gamma, seg, starts)
    return states, vn, finals[:, -1]


def _state_groups_start(cfg, w, u, k, gamma, seg, state0):
    """[B, G, HV, K, V] f32: every sequence group's true start state. Per group, in parallel: its
    end state from zero (end0) and its transition T ([K, K]: the pass without u from the
    identity); then start[g+1] = T[g] @ start[g] + end0[g] for g < G (unrolled: G is small)."""
    B, HV, K, V, G = cfg.B, cfg.HV, cfg.K, cfg.V, cfg.G

    def end_call(width, *extra):
        sp = _seq_specs(cfg, width)
        K_rows = sp["rows"](K)
        return _call(
            _state_end_kernel,
            cfg,
            sp["grid"],
            [K_rows, sp["rows"](K, key_head=True), sp["gates"], sp["seg"]]
            + [sp["rows"]()] * len(extra),
            sp["state"],
            _sds((B, G, HV, K, width), _F32),
            num_warps=cfg.WS,
            num_stages=cfg.stages_seq,
        )(w, k, gamma, seg, *extra)

    return _chain_groups(state0, end_call(K), end_call(V, u))


def _chain_groups(x0, trans, const, reverse=False):
    """[B, G, HV, K, V] f32 from the per-group [B, G, HV, K, K] trans and [B, G, HV, K, V] const:
    x[0] = x0 and x[g+1] = trans[g] @ x[g] + const[g]; reverse: x[G-1] = x0 and
    x[g-1] = trans[g] @ x[g] + const[g]. Unrolled: G is small."""
    G = trans.shape[1]
    xs = [x0.astype(_F32)]
    for g in range(G - 1, 0, -1) if reverse else range(G - 1):
        nxt = jnp.einsum(
            "bhkl,bhlv->bhkv", trans[:, g], xs[-1], precision=jax.lax.Precision.HIGHEST
        )
        xs.append(nxt + const[:, g])
    return jnp.stack(xs[::-1] if reverse else xs, axis=1)


def _output(cfg, q, k, states, vn, gamma, seg, out_dtype):
    B, Tp, HV, K, V, R, BV, C = cfg.B, cfg.Tp, cfg.HV, cfg.K, cfg.V, cfg.R, cfg.BV, cfg.C
    spec = pl.BlockSpec
    qk_spec = spec((None, C, None, K), lambda b, j, n, iv: (b, n, j // R, 0))
    return _call(
        _output_kernel,
        cfg,
        (B, HV, cfg.N, V // BV),
        [
            qk_spec,
            qk_spec,
            spec((None, None, K, BV), lambda b, j, n, iv: (b, j, n, iv)),
            spec((None, C, None, BV), lambda b, j, n, iv: (b, n, j, iv)),
            spec((None, None, C), lambda b, j, n, iv: (b, j, n)),
            spec((None, C), lambda b, j, n, iv: (b, n)),
        ],
        spec((None, C, None, BV), lambda b, j, n, iv: (b, n, j, iv)),
        _sds((B, Tp, HV, V), out_dtype),
        num_warps=cfg.warps_par,
    )(q, k, states, vn, gamma, seg)


def _dv_local(cfg, q, k, w, u, states, gamma, seg, do):
    B, Tp, HV, K, V, R, BV, C = cfg.B, cfg.Tp, cfg.HV, cfg.K, cfg.V, cfg.R, cfg.BV, cfg.C
    spec = pl.BlockSpec
    qk_spec = spec((None, C, None, K), lambda b, j, n, iv: (b, n, j // R, 0))
    cv_spec = spec((None, C, None, BV), lambda b, j, n, iv: (b, n, j, iv))
    return _call(
        _dv_local_kernel,
        cfg,
        (B, HV, cfg.N, V // BV),
        [
            qk_spec,
            qk_spec,
            spec((None, C, None, K), lambda b, j, n, iv: (b, n, j, 0)),
            cv_spec,
            spec((None, None, K, BV), lambda b, j, n, iv: (b, j, n, iv)),
            spec((None, None, C), lambda b, j, n, iv: (b, j, n)),
            spec((None, C), lambda b, j, n, iv: (b, n)),
            cv_spec,
        ],
        [cv_spec, cv_spec],
        [_sds((B, Tp, HV, V), cfg.dtype), _sds((B, Tp, HV, V), cfg.dtype)],
        num_warps=cfg.warps_par,
    )(q, k, w, u, states, gamma, seg, do)


def _vn(cfg, w, u, states):
    B, Tp, HV, K, V, BV, C = cfg.B, cfg.Tp, cfg.HV, cfg.K, cfg.V, cfg.BV, cfg.C
    spec = pl.BlockSpec
    cv_spec = spec((None, C, None, BV), lambda b, j, n, iv: (b, n, j, iv))
    return _call(
        _vn_kernel,
        cfg,
        (B, HV, cfg.N, V // BV),
        [
            spec((None, C, None, K), lambda b, j, n, iv: (b, n, j, 0)),
            cv_spec,
            spec((None, None, K, BV), lambda b, j, n, iv: (b, j, n, iv)),
        ],
        cv_spec,
        _sds((B, Tp, HV, V), cfg.dtype),
        num_warps=cfg.warps_par,
    )(w, u, states)


def _state_bwd(cfg, q, k, w, gamma, seg, do, dv_local, dfinal):
    """Reverse state pass -> (d chunk-start states [B,HV,N*K,V], dv_new [B,Tp,HV,V], d initial
    state [B,HV,K,V] f32); with cfg.G > 1 in G parallel sequence groups, as the forward."""
    B, Tp, HV, K, V, G = cfg.B, cfg.Tp, cfg.HV, cfg.K, cfg.V, cfg.G
    srcs = [do] if cfg.dvl_in_state else [do, dv_local]
    if G == 1:
        ends = dfinal[:, None]
    else:
        ends = _state_groups_end_cotangent(cfg, q, k, w, gamma, seg, srcs, dfinal)
    sp = _seq_specs(cfg)
    V_rows = sp["rows"]()
    qk_rows = sp["rows"](K, key_head=True)
    dst, dvn, dstarts = _call(
        _state_bwd_kernel,
        cfg,
        sp["grid"],
        [qk_rows, qk_rows, sp["rows"](K), sp["gates"], sp["seg"]]
        + [V_rows] * len(srcs)
        + [sp["state"]],
        [sp["chunks"], V_rows, sp["state"]],
        [
            _sds((B, HV, cfg.N * K, V), cfg.dtype),
            _sds((B, Tp, HV, V), cfg.dtype),
            _sds((B, G, HV, K, V), _F32),
        ],
        num_warps=cfg.WSB,
        num_stages=cfg.stages_seq,
    )(q, k, w, gamma, seg, *srcs, ends)
    return dst, dvn, dstarts[:, 0]


def _state_groups_end_cotangent(cfg, q, k, w, gamma, seg, srcs, dfinal):
    """[B, G, HV, K, V] f32: the cotangent of every sequence group's end state. Per group, in
    parallel: its start cotangent from a zero end cotangent with the output's sources (start0)
    and its reverse transition Tr (the pass without sources from the identity); then
    end[g-1] = Tr[g] @ end[g] + start0[g], from end[G-1] = dfinal."""
    B, HV, K, V, G = cfg.B, cfg.HV, cfg.K, cfg.V, cfg.G

    def end_call(width, *extra):
        sp = _seq_specs(cfg, width)
        qk_rows = sp["rows"](K, key_head=True)
        return _call(
            _state_bwd_end_kernel,
            cfg,
            sp["grid"],
            [qk_rows, qk_rows, sp["rows"](K), sp["gates"], sp["seg"]] + [sp["rows"]()] * len(extra),
            sp["state"],
            _sds((B, G, HV, K, width), _F32),
            num_warps=cfg.WSB,
            num_stages=cfg.stages_seq,
        )(q, k, w, gamma, seg, *extra)

    return _chain_groups(dfinal, end_call(K), end_call(V, *srcs), reverse=True)


def _group_specs(cfg, hv):
    """Grid and BlockSpec makers of a backward kernel on a key-head grid (one program per key
    head and chunk, its R value heads in a loop) or, hv=True, a value-head grid."""
    R, C = cfg.R, cfg.C
    nr = 1 if hv else R
    spec = pl.BlockSpec
    kh = (lambda j: j // R) if hv else (lambda h: h)  # key head of grid index 1
    return dict(
        grid=(cfg.B, cfg.HV if hv else cfg.H, cfg.N),
        nr=nr,
        qk=lambda d: spec((None, C, None, d), lambda b, i, n: (b, n, kh(i), 0)),
        # per-program outputs of key-head shape: [B,Tp,H,d], or [B,Tp,HV,d] summed later
        out_qk=lambda d: spec((None, C, None, d), lambda b, i, n: (b, n, i, 0)),
        crv=lambda d: spec((None, C, nr, d), lambda b, i, n: (b, n, i, 0)),
        rc=spec((None, nr, C), lambda b, i, n: (b, i, n)),
        rkv=lambda d1, d2: spec((None, nr, d1, d2), lambda b, i, n: (b, i, n, 0)),
        c=spec((None, C), lambda b, i, n: (b, n)),
    )


def _dqk(cfg, q, k, gamma, seg, states, dstates, vn, do):
    B, Tp, H, HV, K, V = cfg.B, cfg.Tp, cfg.H, cfg.HV, cfg.K, cfg.V
    sp = _group_specs(cfg, cfg.dqk_hv)
    nh = HV if cfg.dqk_hv else H
    pdt = cfg.partial_dtype if cfg.dqk_hv else _F32
    return _call(
        _dqk_kernel,
        cfg,
        sp["grid"],
        [
            sp["qk"](K),
            sp["qk"](K),
            sp["rc"],
            sp["c"],
            sp["rkv"](K, V),
            sp["rkv"](K, V),
            sp["crv"](V),
            sp["crv"](V),
        ],
        [sp["out_qk"](K), sp["out_qk"](K), sp["rc"]],
        [_sds((B, Tp, nh, K), pdt), _sds((B, Tp, nh, K), pdt), _sds((B, HV, Tp), _F32)],
        num_warps=cfg.warps_group,
    )(q, k, gamma, seg, states, dstates, vn, do)


def _wy_bwd(cfg, k, v, gamma, beta, seg, w, u, tinv, states, dvn):
    B, Tp, H, HV, K, V, C = cfg.B, cfg.Tp, cfg.H, cfg.HV, cfg.K, cfg.V, cfg.C
    sp = _group_specs(cfg, cfg.wy_hv)
    nh = HV if cfg.wy_hv else H
    pdt = cfg.partial_dtype if cfg.wy_hv else _F32
    return _call(
        _wy_bwd_kernel,
        cfg,
        sp["grid"],
        [
            sp["qk"](K),
            sp["crv"](V),
            sp["rc"],
            sp["rc"],
            sp["c"],
            sp["crv"](K),
            sp["crv"](V),
            sp["rkv"](C, C),
            sp["rkv"](K, V),
            sp["crv"](V),
        ],
        [sp["out_qk"](K), sp["crv"](V), sp["rc"], sp["rc"]],
        [
            _sds((B, Tp, nh, K), pdt),
            _sds((B, Tp, HV, V), cfg.dtype),
            _sds((B, HV, Tp), _F32),
            _sds((B, HV, Tp), _F32),
        ],
        num_warps=cfg.warps_wy,
    )(k, v, gamma, beta, seg, w, u, tinv, states, dvn)


def _bwd_fused(cfg, q, k, v, gamma, beta, seg, w, u, tinv, states, dstates, vn, do, dvn):
    B, Tp, HV, K, V, C = cfg.B, cfg.Tp, cfg.HV, cfg.K, cfg.V, cfg.C
    sp = _group_specs(cfg, True)
    return _call(
        _bwd_fused_kernel,
        cfg,
        sp["grid"],
        [
            sp["qk"](K),
            sp["qk"](K),
            sp["crv"](V),
            sp["rc"],
            sp["rc"],
            sp["c"],
            sp["crv"](K),
            sp["crv"](V),
            sp["rkv"](C, C),
            sp["rkv"](K, V),
            sp["rkv"](K, V),
            sp["crv"](V),
            sp["crv"](V),
            sp["crv"](V),
        ],
        [sp["out_qk"](K), sp["out_qk"](K), sp["crv"](V), sp["rc"], sp["rc"]],
        [
            _sds((B, Tp, HV, K), cfg.partial_dtype),
            _sds((B, Tp, HV, K), cfg.partial_dtype),
            _sds((B, Tp, HV, V), cfg.dtype),
            _sds((B, HV, Tp), _F32),
            _sds((B, HV, Tp), _F32),
        ],
        num_warps=cfg.warps_fused,
    )(q, k, v, gamma, beta, seg, w, u, tinv, states, dstates, vn, do, dvn)


# --------------------------------------------------------------------------------------------
# Core with custom VJP, and the public entry point
# --------------------------------------------------------------------------------------------


def _forward(cfg, q, k, v, gamma, beta, seg, state0, with_tinv=False):
    w, u, *tinv = _intra(cfg, k, v, gamma, beta, seg, with_tinv=with_tinv)
    states, vn, final = _state_fwd(cfg, w, u, k, gamma, seg, state0)
    o = _output(cfg, q, k, states, vn, gamma, seg, v.dtype)
    return o, final, states, (tinv[0] if tinv else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_core(cfg, q, k, v, gamma, beta, seg, state0):
    """(q, k [B,Tp,H,K], v [B,Tp,HV,V], gamma, beta [B,HV,Tp] f32, seg [B,Tp] i32, state0
    [B,HV,K,V] f32) -> (o [B,Tp,HV,V] in v's dtype, final state f32). Saves the inputs, the
    chunk-start states [B,HV,N*K,V] and, with cfg.save_tinv, the inverse [B,HV,Tp,C] (both in
    the storage dtype) for the backward."""
    o, final, _, _ = _forward(cfg, q, k, v, gamma, beta, seg, state0)
    return o, final


def _pallas_core_fwd(cfg, q, k, v, gamma, beta, seg, state0):
    o, final, states, tinv = _forward(cfg, q, k, v, gamma, beta, seg, state0, cfg.save_tinv)
    return (o, final), (q, k, v, gamma, beta, seg, states, tinv)


def _pallas_core_bwd(cfg, res, cts):
    q, k, v, gamma, beta, seg, states, tinv = res
    do, dfinal = cts
    if tinv is None:
        w, u, tinv = _intra(cfg, k, v, gamma, beta, seg, with_tinv=True)
    else:  # only the whole-chunk W, U products are rerun
        w, u = _wu(cfg, k, v, gamma, beta, seg, tinv)
    if cfg.dvl_in_state:
        vn, dv_local = _vn(cfg, w, u, states), None
    else:
        vn, dv_local = _dv_local(cfg, q, k, w, u, states, gamma, seg, do)
    dstates, dvn, dstate0 = _state_bwd(cfg, q, k, w, gamma, seg, do, dv_local, dfinal)
    # value-head grids give per-value-head dq, dk: sum each key head's group
    group_sum = lambda x: x.reshape(*x.shape[:2], cfg.H, cfg.R, x.shape[-1]).sum(3, dtype=_F32)
    if cfg.fuse_bwd:
        dq, dk, dv, dbeta, dgamma = _bwd_fused(
            cfg, q, k, v, gamma, beta, seg, w, u, tinv, states, dstates, vn, do, dvn
        )
        return (
            group_sum(dq).astype(q.dtype),
            group_sum(dk).astype(k.dtype),
            dv.astype(v.dtype),
            dgamma,
            dbeta,
            None,
            dstate0,
        )
    dq, dk_read, dgamma_read = _dqk(cfg, q, k, gamma, seg, states, dstates, vn, do)
    dk_wy, dv, dbeta, dgamma_wy = _wy_bwd(cfg, k, v, gamma, beta, seg, w, u, tinv, states, dvn)
    if cfg.dqk_hv:
        dq, dk_read = group_sum(dq), group_sum(dk_read)
    if cfg.wy_hv:
        dk_wy = group_sum(dk_wy)
    dk_read, dk_wy = dk_read.astype(_F32), dk_wy.astype(_F32)
    return (
        dq.astype(q.dtype),
        (dk_read + dk_wy).astype(k.dtype),
        dv.astype(v.dtype),
        dgamma_read + dgamma_wy,
        dbeta,
        None,
        dstate0,
    )


_pallas_core.defvjp(_pallas_core_fwd, _pallas_core_bwd)


def _num_sms(interpret: bool) -> int:
    """Multiprocessors of the local GPU (the auto launch config's fill test); 132 (an H100/H200)
    when interpreting or when the device does not say."""
    if interpret:
        return _Cfg.num_sms
    dev = jax.local_devices()[0]
    if dev.platform != "gpu":
        return _Cfg.num_sms
    return int(getattr(dev, "core_count", 0) or _Cfg.num_sms)


def pallas_gated_delta_rule(
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
    interpret=False,
    tuning=None,
):
    """Gated delta rule through the Pallas Triton kernels (interpret=True runs them on CPU).

    Same arguments and results as `delta_rule.chunk_gated_delta_rule`; Dk and Dv must be powers
    of two >= 16 and chunk_size 16, 32 or 64. Differentiable w.r.t. q, k, v, g, beta and
    initial_state; the saved activations are the inputs, the chunk-start states and the
    chunk-local inverse (I + A)^-1 (as fla saves A; tuning save_tinv=False recomputes it),
    O(T*H*Dk + T*HV*(Dv + C) + N*HV*Dk*Dv); W, U and v_new are recomputed. tuning: optional dict
    of _Cfg launch fields and kernel options (see _Cfg). Compiled for the GPU (interpret=False)
    the kernels take 16-bit q, k, v only: with float32 operands the backward's tiles exceed
    shared memory (measured on an H200).
    """
    B, T, H, K, HV, V = dr._check_inputs(q, k, v, g, beta, initial_state, segment_ids)
    dr._check_chunk_size(chunk_size)
    if not dr._pallas_supported(q, v, chunk_size):
        raise ValueError(
            f"The Pallas kernels need Dk, Dv powers of two >= 16 and chunk_size in (16, 32, 64); "
            f"got Dk={K}, Dv={V}, chunk_size={chunk_size}."
        )
    if not interpret and any(jnp.dtype(x.dtype).itemsize != 2 for x in (q, k, v)):
        raise ValueError(
            f"The compiled Pallas kernels take 16-bit q, k, v; got {q.dtype}, {k.dtype}, "
            f"{v.dtype} (use backend='chunk' for float32)."
        )
    scale = K**-0.5 if scale is None else float(scale)
    q_, k_, v_, gamma, beta_, seg = dr._chunk_prepare(
        q, k, v, g, beta, segment_ids, None, chunk_size
    )
    store = v.dtype if jnp.dtype(v.dtype).itemsize == 2 else jnp.dtype(_F32)
    cfg = _Cfg(
        B,
        q_.shape[1],
        H,
        HV,
        K,
        V,
        chunk_size,
        scale,
        jnp.dtype(store).name,
        bool(interpret),
        **{"num_sms": _num_sms(interpret), **(tuning or {})},
    )
    if cfg.gates_kernel and (interpret or (HV >= 16 and HV & (HV - 1) == 0)):
        # Gates in one small kernel (Triton needs a power-of-two HV >= 16 for its product);
        # XLA then drops _chunk_prepare's gamma, a slow associative scan and transposes.
        real_BT, _ = dr._segment_flags(segment_ids, B, T)
        g_ = jnp.where(real_BT[:, :, None], g.astype(_F32), 0.0)
        g_ = jnp.pad(g_, [(0, 0), (0, q_.shape[1] - T), (0, 0)])
        gamma_t, beta_t = _gates(cfg, g_, beta_, seg)
    else:
        gamma_t, beta_t = jnp.swapaxes(gamma, 1, 2), jnp.swapaxes(beta_, 1, 2)
    o, final = _pallas_core(
        cfg,
        q_,
        k_,
        v_,
        gamma_t,
        beta_t,
        seg,
        dr._initial_state(initial_state, B, HV, K, V),
    )
    return o[:, :T], final
