"""The published Qwen3-Next-80B-A3B architecture, exactly (spec §1.1), for pod-scale runs.

    python train.py --config=configs/qwen3_next_80b_a3b.py --workdir=DIR --config.data.corpus=DIR

Sequence length 4096; global batch 512 sequences (2M tokens); bf16 compute, fp32 master weights.
The mesh puts experts on the 'expert' axis and shards everything else with FSDP; set the sizes for
your slice (e.g. --config.mesh.expert=16 --config.mesh.fsdp=-1).
"""

from configs import common
from qwen3next_jax.config import qwen3_next_80b_a3b


def get_config(arg: str | None = None):
    del arg
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
    return c
