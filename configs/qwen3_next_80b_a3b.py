"""The published Qwen3-Next-80B-A3B architecture, exactly (spec §1.1), for pod-scale runs.

    python train.py --config=configs/qwen3_next_80b_a3b.py --workdir=DIR --config.data.corpus=DIR
    python train.py --config=configs/qwen3_next_80b_a3b.py:v6e --workdir=DIR ...   # 32 GiB chips

Sequence length 4096; global batch 512 sequences (2M tokens); bf16 compute, fp32 master weights,
remat per decoder layer. The mesh puts experts on the 'expert' axis and shards everything else
with FSDP. Checked by ahead-of-time compiles (`--aot_topology`, README "Running on TPU pods"):
  (default)  expert 8, fsdp the rest, 1 micro-batch: v5p:8x8x8 27.5 GiB of 95 GiB per chip.
  :v6e       expert 4, fsdp the rest, global batch 256 (1M tokens) in one micro-batch (no
             gradient accumulator), cross-entropy in 1024-token chunks, for 32 GiB chips:
             v6e:16x16 24.43 GiB of 32 GiB per chip.
"""

from configs import common
from qwen3next_jax.config import qwen3_next_80b_a3b

PRESETS = ("v6e",)


def get_config(arg: str | None = None):
    if arg and arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r} for this config; expected one of {PRESETS}.")
    c = common.base_config(qwen3_next_80b_a3b(dtype="bfloat16", remat_policy="full"))
    c.train_steps = 100_000
    c.global_batch_size = 512
    c.data.seq_len = 4096
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.schedule = "wsd"
    c.loss.ce_chunk_tokens = 4096
    c.checkpoint_every = 1000
    c.log_every = 10
    c.mesh = common.ml_collections.ConfigDict({"data": 1, "fsdp": -1, "expert": 8, "tensor": 1})
    if arg == "v6e":
        # A smaller expert group shrinks the all-to-all's fixed receive buffers (they scale with
        # the group size); two micro-batches halve the activations (exact: global LB loss).
        c.mesh.expert = 4
        c.global_batch_size = 256
        c.loss.ce_chunk_tokens = 1024
    return c
