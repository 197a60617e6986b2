"""Held-out evaluation: loss, perplexity, bits per byte, MTP accuracy and acceptance rate."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qwen3next_jax.data import pipeline
from qwen3next_jax.model import Qwen3Next
from qwen3next_jax.training import losses


def eval_sums(model: Qwen3Next, batch: dict) -> dict:
    """Additive statistics of one batch (sums and counts, float32), combined by ``finalize``.

    mtp_correct_d counts positions where MTP depth d's argmax is the data token t+2+d;
    mtp_agree_d counts positions where it equals the main model's own greedy prediction of that
    same token (teacher forced) — the acceptance a greedy speculative decoder would see.
    """
    out = model(batch["inputs"], batch["segment_ids"], batch["positions"])
    mask = batch["loss_mask"].astype(jnp.float32)
    ce_sum, count = losses.cross_entropy(out.logits, batch["targets"], mask)
    sums = {"ce_sum": ce_sum, "count": count}
    if out.mtp_logits is not None:
        main_pred = jnp.argmax(out.logits, axis=-1)
        for d in range(out.mtp_logits.shape[0]):
            tgt, m = losses.mtp_targets(
                batch["targets"], batch["loss_mask"], batch["segment_ids"], d
            )
            m = m.astype(jnp.float32)
            pred = jnp.argmax(out.mtp_logits[d], axis=-1)
            # The main model predicts token t+2+d at position t+1+d.
            main_same = jnp.pad(main_pred[:, d + 1 :], ((0, 0), (0, d + 1)))
            l_sum, _ = losses.cross_entropy(out.mtp_logits[d], tgt, m)
            sums[f"mtp{d}_ce_sum"] = l_sum
            sums[f"mtp{d}_count"] = jnp.sum(m)
            sums[f"mtp{d}_correct"] = jnp.sum(m * (pred == tgt))
            sums[f"mtp{d}_agree"] = jnp.sum(m * (pred == main_same))
    return sums


def finalize(sums: dict, bytes_per_token: float | None) -> dict:
    """Sums -> loss, perplexity (= exp(loss)), bits per byte and per-depth MTP figures."""
    n = max(sums["count"], 1.0)
    loss = sums["ce_sum"] / n
    res = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": sums["count"]}
    if bytes_per_token:
        res["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    d = 0
    while f"mtp{d}_count" in sums:
        c = max(sums[f"mtp{d}_count"], 1.0)
        res[f"mtp{d}_loss"] = sums[f"mtp{d}_ce_sum"] / c
        res[f"mtp{d}_accuracy"] = sums[f"mtp{d}_correct"] / c
        res[f"mtp{d}_acceptance"] = sums[f"mtp{d}_agree"] / c
        d += 1
    return res


def evaluate(trainer, params, data_dir: str, config: ml_collections.ConfigDict) -> dict:
    """Runs ``trainer.eval_step`` over the held-out split (at most ``config.eval_batches``)."""
    local_batch = config.global_batch_size // config.micro_batches // jax.process_count()
    batches = pipeline.make_eval_batches(
        data_dir,
        seq_len=config.data.seq_len,
        batch_size=local_batch,
        model_vocab_size=trainer.model_cfg.vocab_size,
        max_batches=config.eval_batches or None,
    )
    total: dict = {}
    for local in batches:
        batch = {
            k: jax.make_array_from_process_local_data(
                trainer.batch_sharding, np.asarray(v, np.int32)
            )
            for k, v in local.items()
        }
        sums = jax.device_get(trainer.eval_step(params, batch))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + float(v)
    if not total:
        raise ValueError(f"the eval split of {data_dir} yielded no batches.")
    tok = pipeline.corpus_tokenizer(data_dir)
    return finalize(total, 1.0 if tok.name == "byte" else None)
