"""Shared defaults for every experiment config: data, optimizer, losses, mesh, loop knobs."""

from __future__ import annotations

import ml_collections

from qwen3next_jax.config import ModelConfig


def model_config(model: ModelConfig) -> ml_collections.ConfigDict:
    """A ModelConfig as a ConfigDict, so `--config.model.<field>=` overrides any field.

    ``layer_types`` is left out when it is None (the pattern then follows full_attention_interval).
    """
    d = model.to_dict()
    if d["layer_types"] is None:
        del d["layer_types"]
    d["mlp_only_layers"] = tuple(d["mlp_only_layers"])
    d["moe_capacity_factor"] = ml_collections.config_dict.placeholder(float)
    if model.moe_capacity_factor is not None:
        d["moe_capacity_factor"] = model.moe_capacity_factor
    return ml_collections.ConfigDict(d)


def base_config(model: ModelConfig) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model_config(model)
    c.seed = 0
    c.train_steps = 1000
    c.global_batch_size = 32  # sequences per optimizer step, over all processes
    c.micro_batches = 1  # gradient accumulation: the global batch is split into this many parts
    c.log_every = 10
    c.eval_every = 0  # 0 = only at the end
    c.eval_batches = 8
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.nonfinite = "stop"  # stop | skip (skip the update of a step with a non-finite gradient)
    c.init_from = (
        ""  # an Orbax checkpoint folder to start from (e.g. from `python -m qwen3next_jax.hf`)
    )
    c.distributed = False  # call jax.distributed.initialize() (multi-host GPU / TPU pods)

    c.data = ml_collections.ConfigDict()
    c.data.corpus = "builtin"  # 'builtin' (Python stdlib source) or a folder made by data.prepare
    c.data.tokenizer = "byte"  # for 'builtin': 'byte' or a path to a tokenizer.json
    c.data.seq_len = 128
    c.data.num_workers = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"  # cosine | linear | constant | wsd
    c.optim.decay_fraction = 0.2  # wsd only: the final fraction of steps that decays
    c.optim.min_lr_ratio = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = 1.0
    c.optim.decay_norms = True  # zero-centred norm weights are decayed (pulls 1 + w toward 1)
    c.optim.decay_gated_norm = False
    c.optim.decay_embedding = False
    c.optim.decay_a_log_dt_bias = False

    c.loss = ml_collections.ConfigDict()
    c.loss.mtp_weight = 0.1
    c.loss.lb_coef = 1e-3
    c.loss.lb_scope = "global_batch"  # global_batch | micro_batch
    c.loss.z_coef = 0.0
    c.loss.ce_chunk_tokens = 0  # >0: memory-bounded cross-entropy over chunks of this many tokens

    # Parallelism inside one slice (ICI; one size may be -1 = the rest) and across TPU slices
    # (DCN, multi-slice; its product is the number of slices). Axis size = mesh x dcn_mesh.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
    c.dcn_mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})
    return c
