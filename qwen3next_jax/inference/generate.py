"""``generate``: greedy / sampled decoding with optional MTP self-speculative decoding.

    ids = q3n.generate(model, prompt_ids, max_new_tokens=64, temperature=0.0, mtp_draft_tokens=0)

``Generator`` exposes the two jitted halves (``start``: prefill + first token; ``run``: the decode
loop) so benchmarks can time them apart.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3next_jax.inference import decode, speculative
from qwen3next_jax.model import Qwen3Next


@functools.partial(jax.jit, static_argnums=(0, 5))
def _start_jit(graphdef, state, ids_BT, seg_BT, key, opts):
    model = nnx.merge(graphdef, state)
    return speculative.start(model, ids_BT, seg_BT, key, **dict(opts))


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=(2,))
def _run_jit(graphdef, state, carry, opts):
    model = nnx.merge(graphdef, state)
    return speculative.run(model, carry, **dict(opts))


class Generator:
    """Validated options plus the split model; ``start`` then ``run`` then ``finish``."""

    def __init__(
        self,
        model: Qwen3Next,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        mtp_draft_tokens: int = 0,
        eos_id: int | None = None,
        max_len: int | None = None,
    ):
        if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative int.")
        if not temperature >= 0.0:
            raise ValueError(f"temperature={temperature} must be >= 0.")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1].")
        k = int(mtp_draft_tokens)
        if k < 0:
            raise ValueError(f"mtp_draft_tokens={mtp_draft_tokens} must be >= 0.")
        if k and len(model.mtp) == 0:
            raise ValueError(
                f"mtp_draft_tokens={k} needs MTP heads, but the model has num_mtp_layers=0."
            )
        vocab = model.cfg.vocab_size
        if eos_id is not None and not 0 <= eos_id < vocab:
            raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {vocab}).")
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.k = k
        self.max_len = max_len
        self.graphdef, self.state = nnx.split(model)
        self._opts = dict(
            max_new=self.max_new_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            k=k,
            eos_id=None if eos_id is None else int(eos_id),
        )

    def _check_prompt(self, prompt_ids, prompt_lengths):
        ids = np.asarray(prompt_ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"prompt_ids must be [B, T] with T >= 1; got shape {ids.shape}.")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt_ids must be integers; got dtype {ids.dtype}.")
        vocab = self.model.cfg.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"prompt_ids contain ids outside the vocabulary [0, {vocab}).")
        if prompt_lengths is not None:
            lens = np.asarray(prompt_lengths)
            if lens.shape != (ids.shape[0],) or lens.min() < 1 or lens.max() > ids.shape[1]:
                raise ValueError(
                    f"prompt_lengths must be [B] = [{ids.shape[0]}] ints in 1..{ids.shape[1]}; "
                    f"got {lens.tolist()}."
                )
        return ids

    def start(self, prompt_ids, prompt_lengths=None, padding="right", seed=0):
        ids = self._check_prompt(prompt_ids, prompt_lengths)
        T = ids.shape[1]
        k = self.k
        # Active rows write below T + max_new + 2k (see speculative.step); k <= 3 share a shape.
        max_len = self.max_len or T + self.max_new_tokens + 2 * max(k, 3) + 2
        ids_BT, seg_BT = decode.left_align(ids, prompt_lengths, padding)
        opts = {k_: v for k_, v in self._opts.items() if k_ != "k"}
        opts = tuple(sorted({**opts, "max_len": max_len, "mtp": k > 0}.items()))
        key = jax.random.key(seed)
        return _start_jit(self.graphdef, self.state, ids_BT, seg_BT, key, opts)

    def run(self, carry):
        opts = tuple(sorted(self._opts.items()))
        return _run_jit(self.graphdef, self.state, carry, opts)

    @staticmethod
    def finish(prompt_ids, carry, return_stats=False):
        ids = jnp.concatenate([jnp.asarray(prompt_ids, jnp.int32), carry["out"]], axis=1)
        if not return_stats:
            return ids
        steps = np.asarray(carry["steps"])
        accepted = np.asarray(carry["accepted"])
        stats = {
            "steps": steps,  # target-model forwards per row (prefill included)
            "accepted": accepted,  # accepted drafts per row; steps + accepted = generated
            "generated": np.asarray(carry["generated"]),
            "accept_hist": np.asarray(carry["hist"]),  # [k+1]: forwards that accepted i drafts
            "mean_accepted_per_step": float(accepted.sum() / max(steps.sum(), 1)),
        }
        return ids, stats


def generate(
    model: Qwen3Next,
    prompt_ids,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    mtp_draft_tokens: int = 0,
    seed: int = 0,
    eos_id: int | None = None,
    prompt_lengths=None,
    *,
    padding: str = "right",
    return_stats: bool = False,
):
    """Continues ``prompt_ids`` [B,T]; returns ids [B, T + max_new_tokens] int32.

    Columns T.. hold the new tokens; a row that emitted ``eos_id`` is filled with it afterwards.
    ``prompt_lengths`` [B] marks ragged prompts padded on the ``padding`` side ('right' or
    'left'); padding never influences the continuation. ``temperature`` 0 is greedy, otherwise
    sampling from softmax(logits / temperature) restricted to the ``top_p`` nucleus.
    ``mtp_draft_tokens`` = k >= 1 turns on MTP self-speculative decoding (k drafts per step, one
    verify forward); greedy output is identical to k = 0. ``return_stats=True`` also returns a
    dict with per-row ``steps`` (target forwards, prefill included) and ``accepted`` drafts
    (steps + accepted = generated tokens), ``accept_hist`` and ``mean_accepted_per_step``.
    """
    gen = Generator(
        model,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        mtp_draft_tokens=mtp_draft_tokens,
        eos_id=eos_id,
    )
    if gen.max_new_tokens == 0:
        ids = jnp.asarray(gen._check_prompt(prompt_ids, prompt_lengths), jnp.int32)
        B = ids.shape[0]
        z = np.zeros((B,), np.int32)
        stats = {
            "steps": z,
            "accepted": z,
            "generated": z,
            "accept_hist": np.zeros((gen.k + 1,), np.int32),
            "mean_accepted_per_step": 0.0,
        }
        return (ids, stats) if return_stats else ids
    carry = gen.start(prompt_ids, prompt_lengths, padding, seed)
    carry = gen.run(carry)
    return gen.finish(prompt_ids, carry, return_stats)
