"""The decoding loop, plain (k = 0) and MTP self-speculative (k >= 1), inside one lax.while_loop.

One step with k drafts (spec §2.6.3, vLLM's EAGLE/MTP proposer):
  1. draft: MTP depth 0 turns the post-norm hidden of the last committed position (paired with
     the pending token) into draft 1, then recycles its own post-norm hidden with each drafted
     token at the next position for drafts 2..k (one MTP depth reused k times);
  2. verify: the main model runs [pending, d_1..d_k] in ONE cached forward (GDN layers keep the
     state after every token; attention writes k+1 K/V rows);
  3. accept: the longest prefix of drafts the model agrees with (greedy: equal to its argmax;
     sampling: the standard speculative-sampling test, which leaves the output distribution that
     of the model), plus the model's own next token;
  4. commit: GDN conv windows and states roll to the accepted position from the kept per-token
     states (no recomputation); KV caches only move their length;
  5. MTP catch-up: MTP depth 0 re-runs the k+1 verified positions with the main model's hidden
     states and the now known next tokens, overwriting the drafted entries of its KV cache, and
     yields draft 1 of the next step from the last accepted position.
With k = 0 steps 1, 2's extra tokens and 5 vanish and this is plain decoding. With temperature 0
every emitted token is the main model's argmax given the committed prefix, so the output equals
plain greedy decoding token for token.

Deeper MTP heads (num_mtp_layers > 1) are not used for drafting: depth 0 is recycled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3next_jax.inference import decode, sampling


def _take(x_BT, idx_B):
    """x[b, idx[b]] for x [B, T, ...]."""
    idx = idx_B.reshape(idx_B.shape + (1,) * (x_BT.ndim - 1))
    return jnp.take_along_axis(x_BT, idx, axis=1)[:, 0]


def start(model, ids_BT, seg_BT, key, *, max_len, max_new, temperature, top_p, mtp, eos_id):
    """Prefill, the first sampled token and (with ``mtp``) the MTP prefill -> the loop carry
    (without ``hist``, which ``run`` adds: its size depends on k)."""
    B = ids_BT.shape[0]
    h_BTD, caches = decode._prefill(model, ids_BT, seg_BT, max_len)
    key, sub = jax.random.split(key)
    logits_BV = model.logits(h_BTD[:, -1:])[:, 0]
    first_B = sampling.sample(sub, logits_BV, temperature, top_p)
    if mtp:
        m_BD, caches = decode.mtp_prefill(model, caches, h_BTD, ids_BT, seg_BT, first_B)
    else:
        m_BD = jnp.zeros((B, 0), h_BTD.dtype)
    fill = 0 if eos_id is None else eos_id
    out = jnp.full((B, max_new), fill, jnp.int32).at[:, 0].set(first_B)
    done = jnp.full((B,), max_new <= 1)
    if eos_id is not None:
        done = done | (first_B == eos_id)
    return dict(
        caches=caches,
        next=first_B,
        mtp_h=m_BD,
        out=out,
        generated=jnp.ones((B,), jnp.int32),
        done=done,
        key=key,
        steps=jnp.ones((B,), jnp.int32),  # target-model forwards, the prefill included
        accepted=jnp.zeros((B,), jnp.int32),  # drafts accepted (each forward adds 1 more token)
    )


def _draft(model, caches, mtp_h, key, k, temperature, top_p):
    """k draft tokens [B,k] (and their draft distributions [B,k,V] when sampling)."""
    kv = caches.mtp[0]
    m_BD = mtp_h
    drafts, qs = [], []
    for j in range(k):
        key, sub = jax.random.split(key)
        logits_BV = model.logits(m_BD[:, None])[:, 0]
        d_B = sampling.sample(sub, logits_BV, temperature, top_p)
        drafts.append(d_B)
        if temperature > 0:
            qs.append(sampling.probs(logits_BV, temperature, top_p))
        if j < k - 1:
            at_B = caches.length + j  # MTP position n+j pairs its own hidden with draft j+1
            m_B1D, kv = decode.mtp_cached(model, caches, kv, m_BD[:, None], d_B[:, None], at_B)
            m_BD = m_B1D[:, 0]
    q = jnp.stack(qs, axis=1) if qs else None
    return jnp.stack(drafts, axis=1), q, kv


def _accept(key, logits_BTV, drafts_Bk, q_BkV, temperature, top_p):
    """(accepted count a [B], tokens [B,k+1]: the emitted tokens are tokens[:, :a+1])."""
    k = drafts_Bk.shape[1]
    if temperature == 0.0:
        target_BT = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
        match = drafts_Bk == target_BT[:, :k]
        a_B = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)
        return a_B, target_BT
    p_BTV = sampling.probs(logits_BTV, temperature, top_p)
    ku, kb = jax.random.split(key)
    if k:
        pd = jnp.take_along_axis(p_BTV[:, :k], drafts_Bk[..., None], axis=-1)[..., 0]
        qd = jnp.take_along_axis(q_BkV, drafts_Bk[..., None], axis=-1)[..., 0]
        u = jax.random.uniform(ku, pd.shape)
        ok = u * qd < pd  # accept with probability min(1, p/q)
        a_B = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
        q_pad = jnp.concatenate([q_BkV, jnp.zeros_like(p_BTV[:, :1])], axis=1)
        resid = jnp.maximum(_take(p_BTV, a_B) - _take(q_pad, a_B), 0.0)
        total = jnp.sum(resid, axis=-1, keepdims=True)
        dist = jnp.where(total > 0, resid / jnp.where(total > 0, total, 1.0), _take(p_BTV, a_B))
    else:
        a_B = jnp.zeros(logits_BTV.shape[:1], jnp.int32)
        dist = p_BTV[:, 0]
    bonus_B = jax.random.categorical(kb, jnp.log(dist)).astype(jnp.int32)
    i_T = jnp.arange(k + 1)
    d_pad = jnp.concatenate([drafts_Bk, bonus_B[:, None]], axis=1)
    return a_B, jnp.where(i_T[None] < a_B[:, None], d_pad, bonus_B[:, None])


def step(model, c, *, max_new, temperature, top_p, k, eos_id):
    """One draft/verify/accept/commit step of every row (finished rows do not advance)."""
    caches = c["caches"]
    key, kd, ka = jax.random.split(c["key"], 3)
    active = ~c["done"]
    if k:
        drafts, q, mtp_kv = _draft(model, caches, c["mtp_h"], kd, k, temperature, top_p)
        ids = jnp.concatenate([c["next"][:, None], drafts], axis=1)
    else:
        drafts, q = jnp.zeros((c["next"].shape[0], 0), jnp.int32), None
        ids = c["next"][:, None]
    h_BTD, pending = decode.forward_cached(model, caches, ids)
    logits = model.logits(h_BTD)
    a_B, tokens = _accept(ka, logits, drafts, q, temperature, top_p)

    # Emit tokens[:, :a+1], capped by the budget and cut after an EOS.
    i_T = jnp.arange(k + 1, dtype=jnp.int32)
    n_emit = jnp.minimum(a_B + 1, max_new - c["generated"])
    hit_eos = jnp.zeros_like(active)
    if eos_id is not None:
        is_eos = (tokens == eos_id) & (i_T[None] < n_emit[:, None])
        hit_eos = jnp.any(is_eos, axis=1)
        n_emit = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, n_emit)
    n_emit = jnp.where(active, n_emit, 0)
    cols = jnp.where(i_T[None] < n_emit[:, None], c["generated"][:, None] + i_T[None], max_new)
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], cols.shape)
    out = c["out"].at[rows, cols].set(tokens, mode="drop")
    generated = c["generated"] + n_emit
    done = c["done"] | (generated >= max_new) | hit_eos

    new = dict(c)
    if k:
        # MTP catch-up over the verified positions n..n+k with the main hidden states.
        m_BTD, mtp_kv = decode.mtp_cached(model, caches, mtp_kv, h_BTD, tokens, caches.length)
        new["mtp_h"] = _take(m_BTD, a_B)
        caches = caches.replace(mtp=(mtp_kv,))
    new["caches"] = decode.commit(caches, pending, a_B, active)
    new.update(
        next=_take(tokens, a_B),
        out=out,
        generated=generated,
        done=done,
        key=key,
        steps=c["steps"] + active.astype(jnp.int32),
        accepted=c["accepted"] + jnp.maximum(n_emit - 1, 0),
        hist=c["hist"].at[jnp.maximum(n_emit - 1, 0)].add(active.astype(jnp.int32)),
    )
    return new


def run(model, c, **kw):
    """Steps until every row is done (generated max_new tokens or emitted EOS)."""
    if "hist" not in c:  # forwards that accepted i drafts; the prefill accepted none
        B = c["next"].shape[0]
        c = {**c, "hist": jnp.zeros((kw["k"] + 1,), jnp.int32).at[0].add(B)}
    return jax.lax.while_loop(lambda c: jnp.any(~c["done"]), lambda c: step(model, c, **kw), c)
