"""Prefill and cached decoding of Qwen3Next (spec §4.5-4.7).

``prefill`` runs the prompt through the training kernels (chunked delta rule, full causal
attention) and returns the caches. ``forward_cached`` runs T new tokens per row against the caches
(T = 1 for plain decoding, k+1 for speculative verification): Gated DeltaNet layers do a conv-window
shift and T single-step delta-rule updates, keeping the state after every token; attention layers
write their K/V at each row's length and read the cache once. ``commit`` then keeps any prefix
(rollback without recomputation). ``decode_step`` is forward_cached + commit for one token.

Padding never leaks: prompts are left-aligned (right-padded prompts are rotated), padding tokens
carry segment id 0 (the GDN layer zeroes them before its projections and the delta rule treats
them as no-ops), and attention reads mask every slot before a row's ``start``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax import sharding
from qwen3next_jax.config import LINEAR
from qwen3next_jax.inference.cache import Caches, GDNPending, KVCache
from qwen3next_jax.layers import params
from qwen3next_jax.layers.deltanet import DeltaNetCache, l2norm
from qwen3next_jax.model import Qwen3Next, positions_from_segments
from qwen3next_jax.ops import attention as attention_ops
from qwen3next_jax.ops import conv as conv_ops
from qwen3next_jax.ops import delta_rule

# ------------------------------------------------------------------------------------ helpers


def left_align(prompt_ids, lengths=None, padding: str = "right"):
    """(ids, segment_ids) with each row's real tokens moved to the end: [B,T] int32 each."""
    ids = jnp.asarray(prompt_ids, jnp.int32)
    B, T = ids.shape
    if lengths is None:
        return ids, jnp.ones((B, T), jnp.int32)
    if padding not in ("right", "left"):
        raise ValueError(f"padding={padding!r} must be 'right' or 'left'.")
    lengths = jnp.asarray(lengths, jnp.int32)
    s = jnp.arange(T, dtype=jnp.int32)
    if padding == "right":
        src = (s[None, :] - (T - lengths)[:, None]) % T
        ids = jnp.take_along_axis(ids, src, axis=1)
    seg = (s[None, :] >= (T - lengths)[:, None]).astype(jnp.int32)
    return jnp.where(seg != 0, ids, 0), seg


def _apply_layer(layer, x_BTD, mixer_fn):
    """DecoderLayer.__call__ with the mixer replaced by ``mixer_fn(mixer, h) -> (h, cache)``."""
    h_BTD = layer.input_norm(x_BTD)
    h_BTD, cache = mixer_fn(layer.mixer, h_BTD)
    x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)
    h_BTD = layer.post_norm(x_BTD)
    if layer.moe:
        h_BTD, _ = layer.ffn(h_BTD)
    else:
        h_BTD = layer.ffn(h_BTD)
    x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)
    return sharding.constrain(x_BTD, ("batch", "seq", "act_embed")), cache


def _write_rows(cache_BSKH, new_BTKH, at_B):
    """Writes new[b] at slots at[b] .. at[b]+T-1 of cache[b]."""
    write = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), i, axis=0)
    return jax.vmap(write)(cache_BSKH, new_BTKH, at_B)


def cached_attention(q_BTNH, k_BSKH, v_BSKH, start_B, length_B):
    """Query i of row b sits at slot length[b]+i and reads slots [start[b], length[b]+i].

    Same numerics as ops.attention's XLA path (float32 logits and softmax).
    """
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    slot_S = jnp.arange(S, dtype=jnp.int32)
    qslot_BT = length_B[:, None] + jnp.arange(T, dtype=jnp.int32)
    allowed_BTS = (slot_S >= start_B[:, None, None]) & (slot_S <= qslot_BT[:, :, None])
    return attention_ops.masked_attention(q_BTNH, k_BSKH, v_BSKH, allowed_BTS)


# ------------------------------------------------------------------------------------- mixers


def _attn_prefill(m, h_BTD, positions_BT, seg_BT, max_len):
    q, k, v, gate = m.qkv(h_BTD, positions_BT)
    attn = attention_ops.causal_attention(
        q, k, v, segment_ids_BT=seg_BT, backend=m.cfg.attention_backend
    )
    T = h_BTD.shape[1]
    pad = ((0, 0), (0, max_len - T), (0, 0), (0, 0))
    return m.output(attn, gate), KVCache(jnp.pad(k, pad), jnp.pad(v, pad))


def _attn_cached(m, h_BTD, positions_BT, kv: KVCache, start_B, length_B):
    q, k, v, gate = m.qkv(h_BTD, positions_BT)
    k_cache = _write_rows(kv.k, k, length_B)
    v_cache = _write_rows(kv.v, v, length_B)
    attn = cached_attention(q, k_cache, v_cache, start_B, length_B)
    return m.output(attn, gate), KVCache(k_cache, v_cache)


def _gdn_zero_cache(m, B):
    cfg = m.cfg
    Km = cfg.linear_conv_kernel_dim - 1
    HV, Dk, Dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    return DeltaNetCache(
        jnp.zeros((B, Km, cfg.gdn_key_dim), m.dtype),
        jnp.zeros((B, Km, cfg.gdn_key_dim), m.dtype),
        jnp.zeros((B, Km, cfg.gdn_value_dim), m.dtype),
        jnp.zeros((B, HV, Dk, Dv), jnp.float32),
    )


def _gdn_prefill(m, h_BTD, seg_BT):
    return m(h_BTD, seg_BT, cache=_gdn_zero_cache(m, h_BTD.shape[0]))


def _gdn_cached(m, x_BTD, c: DeltaNetCache):
    """GatedDeltaNet.__call__ for a few new tokens after ``c``: conv from the cached window, one
    delta-rule step per token (O(1) per token), every intermediate state kept (GDNPending)."""
    dt = m.dtype
    q_BTHK = params.project(x_BTD, m.wq_DHK, "btd,dhk->bthk", dt)
    k_BTHK = params.project(x_BTD, m.wk_DHK, "btd,dhk->bthk", dt)
    v_BTHV = params.project(x_BTD, m.wv_DHV, "btd,dhv->bthv", dt)
    z_BTHV = params.project(x_BTD, m.wz_DHV, "btd,dhv->bthv", dt)
    gate_in = lambda w: jnp.einsum(
        "btd,dh->bth", x_BTD.astype(dt), w[...].astype(dt), preferred_element_type=jnp.float32
    )
    b_BTH, a_BTH = gate_in(m.wb_DH), gate_in(m.wa_DH)

    def conv(x_BTHD, w, state_BKmC):
        B, T, H, Dh = x_BTHD.shape
        x_BTC = x_BTHD.reshape(B, T, H * Dh)
        y_BTC = conv_ops.causal_depthwise_conv(
            x_BTC, w[...].reshape(w.shape[0], H * Dh), state_BKmC=state_BKmC
        )
        xp = jnp.concatenate([state_BKmC.astype(x_BTC.dtype), x_BTC], axis=1)
        return jax.nn.silu(y_BTC).reshape(B, T, H, Dh), xp

    q_BTHK, xq = conv(q_BTHK, m.conv_q_KHD, c.conv_q)
    k_BTHK, xk = conv(k_BTHK, m.conv_k_KHD, c.conv_k)
    v_BTHV, xv = conv(v_BTHV, m.conv_v_KHD, c.conv_v)
    beta_BTH = jax.nn.sigmoid(b_BTH)
    g_BTH = -jnp.exp(m.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
        a_BTH + m.dt_bias[...].astype(jnp.float32)
    )
    q_BTHK = l2norm(q_BTHK).astype(dt)
    k_BTHK = l2norm(k_BTHK).astype(dt)

    def step(state, xs):
        o, state = delta_rule.gated_delta_rule_step(*xs, state)
        return state, (o, state)

    xs = [jnp.moveaxis(x, 1, 0) for x in (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH)]
    _, (o_TBHV, states_TBHKV) = jax.lax.scan(step, c.state.astype(jnp.float32), xs)
    o_BTHV = jnp.moveaxis(o_TBHV, 0, 1)
    y_BTHV = m.norm(o_BTHV, z_BTHV)
    y_BTD = params.project(y_BTHV, m.wo_HVD, "bthv,hvd->btd", dt)
    return y_BTD, GDNPending(xq, xk, xv, jnp.moveaxis(states_TBHKV, 0, 1))


# ------------------------------------------------------------------------------------ prefill


def _prefill(model: Qwen3Next, ids_BT, seg_BT, max_len: int):
    """Returns (post-norm hidden [B,T,D], Caches) for left-aligned ids / segment ids."""
    B, T = ids_BT.shape
    positions_BT = positions_from_segments(seg_BT)
    x_BTD = model.embed(ids_BT)
    graphdef, state = nnx.split(model.blocks)

    def body(x, block_state):
        block = nnx.merge(graphdef, block_state)
        caches = []
        for layer in block.layers:
            if layer.layer_type == LINEAR:
                fn = lambda mx, h: _gdn_prefill(mx, h, seg_BT)
            else:
                fn = lambda mx, h: _attn_prefill(mx, h, positions_BT, seg_BT, max_len)
            x, c = _apply_layer(layer, x, fn)
            caches.append(c)
        return x, tuple(caches)

    x_BTD, layer_caches = jax.lax.scan(body, x_BTD, state)
    start = T - jnp.sum(seg_BT != 0, axis=1).astype(jnp.int32)
    caches = Caches(layer_caches, (), start, jnp.full((B,), T, jnp.int32))
    return model.final_norm(x_BTD), caches


def _mtp_apply(head, h_BTD, tok_BT, model, mixer_fn):
    """MTPHead.__call__ with its attention replaced by ``mixer_fn``."""
    e_BTD = head.pre_fc_norm_embedding(model.embed(tok_BT))
    h_BTD = head.pre_fc_norm_hidden(h_BTD)
    z_BT2D = jnp.concatenate([e_BTD, h_BTD], axis=-1)
    z_BTD = params.project(z_BT2D, head.fc_2DD, "btc,cd->btd", head.dtype)
    z_BTD, kv = _apply_layer(head.layer, z_BTD, mixer_fn)
    return head.norm(z_BTD), kv


def mtp_prefill(model: Qwen3Next, caches: Caches, h_BTD, ids_BT, seg_BT, next_B):
    """MTP depth 0 over the prompt: position t pairs h_t with token t+1 (the last position with
    the freshly sampled ``next_B``). Returns (post-norm MTP hidden at the last slot [B,D], caches
    with the MTP KV cache)."""
    next_ids = jnp.concatenate([ids_BT[:, 1:], next_B[:, None].astype(ids_BT.dtype)], axis=1)
    positions_BT = positions_from_segments(seg_BT)
    max_len = caches.max_len
    m_BTD, kv = _mtp_apply(
        model.mtp[0],
        h_BTD,
        next_ids,
        model,
        lambda mx, h: _attn_prefill(mx, h, positions_BT, seg_BT, max_len),
    )
    return m_BTD[:, -1], caches.replace(mtp=(kv,))


def mtp_cached(model: Qwen3Next, caches: Caches, kv: KVCache, h_BTD, tok_BT, at_B):
    """MTP depth 0 on T new (hidden, next token) pairs written at slots at[b].. of ``kv``."""
    T = tok_BT.shape[1]
    positions_BT = (at_B - caches.start)[:, None] + jnp.arange(T, dtype=jnp.int32)
    return _mtp_apply(
        model.mtp[0],
        h_BTD,
        tok_BT,
        model,
        lambda mx, h: _attn_cached(mx, h, positions_BT, kv, caches.start, at_B),
    )


# ----------------------------------------------------------------------------- cached forward


def forward_cached(model: Qwen3Next, caches: Caches, ids_BT):
    """T new tokens per row at slots length[b].. -> (post-norm hidden [B,T,D], pending tuple).

    Nothing is committed: pass the result to ``commit`` with how many tokens to keep.
    """
    T = ids_BT.shape[1]
    positions_BT = (caches.length - caches.start)[:, None] + jnp.arange(T, dtype=jnp.int32)
    x_BTD = model.embed(ids_BT)
    graphdef, state = nnx.split(model.blocks)

    def body(x, xs):
        block_state, layer_caches = xs
        block = nnx.merge(graphdef, block_state)
        pending = []
        for layer, c in zip(block.layers, layer_caches, strict=True):
            if layer.layer_type == LINEAR:
                fn = lambda mx, h, c=c: _gdn_cached(mx, h, c)
            else:
                fn = lambda mx, h, c=c: _attn_cached(
                    mx, h, positions_BT, c, caches.start, caches.length
                )
            x, p = _apply_layer(layer, x, fn)
            pending.append(p)
        return x, tuple(pending)

    x_BTD, pending = jax.lax.scan(body, x_BTD, (state, caches.layers))
    return model.final_norm(x_BTD), pending


def _rows_slice(x, start_B, size):
    """x [N, B, L, ...] -> x[n, b, start[b] : start[b]+size] for every n, b."""
    f = lambda xb, s: jax.lax.dynamic_slice_in_dim(xb, s, size, axis=0)
    return jax.vmap(jax.vmap(f), in_axes=(0, None))(x, start_B)


def commit(caches: Caches, pending: tuple, accepted_B, active_B=None) -> Caches:
    """Keeps the first accepted[b]+1 tokens of a ``forward_cached`` call in row b.

    GDN layers take the conv window and recurrent state saved after that token; KV caches keep
    what was written and simply extend ``length``. Rows with active=False do not advance.
    """
    layers = []
    for p in pending:
        if isinstance(p, GDNPending):
            km = p.xp_q.shape[2] - p.states.shape[2]  # conv_kernel - 1
            win = lambda x, km=km: _rows_slice(x, accepted_B + 1, km)
            state = _rows_slice(p.states, accepted_B, 1)[:, :, 0]
            layers.append(DeltaNetCache(win(p.xp_q), win(p.xp_k), win(p.xp_v), state))
        else:
            layers.append(p)
    length = caches.length + accepted_B + 1
    if active_B is not None:
        length = jnp.where(active_B, length, caches.length)
    return caches.replace(layers=tuple(layers), length=length.astype(jnp.int32))


# ------------------------------------------------------------------------------ public, jitted


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill_jit(graphdef, state, ids_BT, seg_BT, max_len):
    model = nnx.merge(graphdef, state)
    h_BTD, caches = _prefill(model, ids_BT, seg_BT, max_len)
    h_BD = h_BTD[:, -1]
    return model.logits(h_BD[:, None])[:, 0], h_BD, caches


def prefill(model: Qwen3Next, prompt_ids, lengths=None, *, max_len=None, padding="right"):
    """Runs the prompt; returns (logits of the last real token [B,V] f32, its post-norm hidden
    [B,D], Caches). ``lengths`` [B] gives ragged prompt lengths with ``padding`` 'right' (real
    tokens first) or 'left'; ``max_len`` (default T + 256) sizes the attention KV caches.
    """
    ids_BT, seg_BT = left_align(prompt_ids, lengths, padding)
    T = ids_BT.shape[1]
    max_len = T + 256 if max_len is None else int(max_len)
    if max_len < T:
        raise ValueError(f"max_len={max_len} is shorter than the prompt ({T} tokens).")
    graphdef, state = nnx.split(model)
    return _prefill_jit(graphdef, state, ids_BT, seg_BT, max_len)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode_step_jit(graphdef, state, caches, token_B):
    model = nnx.merge(graphdef, state)
    h_B1D, pending = forward_cached(model, caches, token_B[:, None])
    caches = commit(caches, pending, jnp.zeros_like(caches.length))
    return model.logits(h_B1D)[:, 0], h_B1D[:, 0], caches


def decode_step(model: Qwen3Next, caches: Caches, token, positions=None):
    """One token per row -> (logits [B,V] f32, post-norm hidden [B,D], new Caches).

    ``positions`` (optional) must equal ``caches.length - caches.start`` (each row's next
    position); they are implied by the caches. The input ``caches`` are donated.
    """
    token = jnp.asarray(token, jnp.int32)
    if positions is not None:
        expected = caches.length - caches.start
        if not bool(jnp.all(jnp.asarray(positions) == expected)):
            raise ValueError(
                f"positions {positions} disagree with the caches' next positions {expected}."
            )
    graphdef, state = nnx.split(model)
    return _decode_step_jit(graphdef, state, caches, token)
