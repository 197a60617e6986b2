"""train_and_evaluate(config, workdir): the pretraining loop.

Resumes from the newest finalised checkpoint in ``workdir/checkpoints`` (model, optimizer, step and
the data iterator together, so resume sees exactly the batches it would have seen); logs to
``metrics.jsonl``, TensorBoard and a progress bar; saves every ``checkpoint_every`` steps and at
the end; on SIGTERM finishes the step, saves, waits for the save and returns.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from qwen3next_jax import sharding
from qwen3next_jax.config import ConfigError
from qwen3next_jax.data import pipeline
from qwen3next_jax.data.corpus import builtin_corpus_dir
from qwen3next_jax.training import checkpointing, train_step
from qwen3next_jax.training import metrics as metrics_lib
from qwen3next_jax.training.evaluate import evaluate

log = logging.getLogger(__name__)


def resolve_data_dir(config: ml_collections.ConfigDict) -> str:
    if config.data.corpus == "builtin":
        return str(builtin_corpus_dir(config.data.tokenizer))
    return str(config.data.corpus)


def validate(config: ml_collections.ConfigDict) -> None:
    """Cheap checks with one clear sentence each, before anything compiles."""
    n_proc = jax.process_count()
    gb, micro = int(config.global_batch_size), int(config.micro_batches)
    if gb <= 0 or micro <= 0:
        raise ConfigError(f"global_batch_size={gb} and micro_batches={micro} must be positive.")
    if gb % (n_proc * micro):
        raise ConfigError(
            f"global_batch_size={gb} is not divisible by process_count ({n_proc}) × "
            f"micro_batches ({micro})."
        )
    if config.train_steps <= 0:
        raise ConfigError(f"train_steps={config.train_steps} must be positive.")
    if config.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"nonfinite={config.nonfinite!r} must be 'stop' or 'skip'.")
    if config.loss.lb_scope not in ("global_batch", "micro_batch"):
        raise ConfigError(
            f"loss.lb_scope={config.loss.lb_scope!r} must be 'global_batch' or 'micro_batch'."
        )
    if config.data.seq_len <= 0:
        raise ConfigError(f"data.seq_len={config.data.seq_len} must be positive.")


def _global_batch(local: dict, sharding_) -> dict:
    return {
        k: jax.make_array_from_process_local_data(sharding_, np.asarray(v, np.int32))
        for k, v in local.items()
    }


def check_divisible(config, mesh):
    batch_shards = 1
    for a in sharding.DEFAULT_RULES["batch"]:
        batch_shards *= mesh.shape[a]
    per_micro = config.global_batch_size // config.micro_batches
    if per_micro % batch_shards:
        raise ConfigError(
            f"global_batch_size / micro_batches = {per_micro} sequences cannot be split over the "
            f"{batch_shards} batch shards of mesh {dict(mesh.shape)}."
        )


def _first_nonfinite(state, trainer) -> str | None:
    bad_step = int(jax.device_get(state["nonfinite_step"]))
    if bad_step < 0:
        return None
    flags = np.asarray(jax.device_get(state["nonfinite_leaves"]))
    leaf = next((p for p, f in zip(trainer.param_paths, flags, strict=True) if f), "the loss")
    return f"step {bad_step}: non-finite gradient first in {leaf}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs training to ``config.train_steps`` (resuming if possible) and a final eval.

    Returns the final eval metrics.
    """
    if config.distributed:
        jax.distributed.initialize()
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    chief = jax.process_index() == 0
    data_dir = resolve_data_dir(config)
    mcfg = train_step.model_config_from(config)
    index = pipeline.load_index(data_dir)
    pipeline.check_vocab(index, mcfg.vocab_size)

    mesh = sharding.mesh_from_config(config)
    check_divisible(config, mesh)
    trainer = train_step.build(config, mesh)
    if chief:
        metrics_lib.write_config(
            workdir, {**config.to_dict(), "data_dir": data_dir, "model_resolved": mcfg.to_dict()}
        )

    local_batch = config.global_batch_size // jax.process_count()
    data_iter = pipeline.make_train_iterator(
        data_dir,
        seq_len=config.data.seq_len,
        batch_size=local_batch,
        seed=config.seed,
        model_vocab_size=mcfg.vocab_size,
        num_workers=config.data.num_workers,
    )
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.keep_checkpoints,
        save_every=config.checkpoint_every,
        async_save=config.async_checkpointing,
    )
    abstract = train_step.abstract_with_shardings(trainer)
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            ckpt.check_compatible(abstract, latest)
        except ConfigError as e:
            raise ConfigError(
                f"{str(e).rstrip('.')}; resume with the config this workdir was trained with, "
                "or use a new --workdir."
            ) from None
    restored = ckpt.restore(abstract)
    if restored is not None:
        start, state, data_state, _ = restored
        if data_state:
            data_iter.set_state(data_state)
        log.info("resumed from step %d", start)
    elif config.init_from:
        start, state = 0, _init_from(config.init_from, trainer, abstract)
    else:
        start, state = 0, trainer.init()
    if chief:
        print(f"{'resuming' if start else 'starting'} at step {start} of {config.train_steps}")

    flops = metrics_lib.flops_per_token(mcfg, config.data.seq_len)
    tokens_per_step = config.global_batch_size * config.data.seq_len
    throughput = metrics_lib.Throughput(
        tokens_per_step=tokens_per_step,
        flops_per_token=flops["train"],
        num_devices=jax.device_count(),
        peak_flops_per_device=metrics_lib.peak_flops_per_device(jax.devices()[0]),
    )
    # The guard goes up before the metrics file appears, so a SIGTERM from then on (orchestrators
    # send it at any moment) is a graceful save-and-exit, never a kill mid-setup.
    with checkpointing.PreemptionGuard() as guard:
        writer = metrics_lib.MetricsWriter(
            workdir, total_steps=config.train_steps, start_step=start, is_chief=chief
        )
        step = start
        t_last, steps_since = time.perf_counter(), 0
        compile_s = None
        while step < config.train_steps:
            batch = _global_batch(next(data_iter), trainer.batch_sharding)
            t0 = time.perf_counter()
            state, step_metrics = trainer.train_step(state, batch)
            step += 1
            steps_since += 1
            if compile_s is None:
                # The first step includes compilation: keep it out of the throughput figures.
                jax.block_until_ready(state["step"])
                compile_s = time.perf_counter() - t0
                t_last, steps_since = time.perf_counter(), 0
            if step % config.log_every == 0 or step == config.train_steps:
                host = jax.device_get(step_metrics)
                now = time.perf_counter()
                record = {k: _to_float(v) for k, v in host.items()}
                if steps_since:
                    dt = (now - t_last) / steps_since
                    record.update(throughput(dt))
                    record["step_time_s"] = dt
                t_last, steps_since = now, 0
                record["compile_time_s"] = compile_s
                writer.write(step, record)
                _stop_if_nonfinite(config, state, trainer, ckpt)
            stop = checkpointing.should_stop(ckpt, guard, step)
            if step % config.checkpoint_every == 0 or step == config.train_steps or stop:
                _stop_if_nonfinite(config, state, trainer, ckpt)
                ckpt.save(step, state, data_iter.get_state(), {"step": step}, force=True)
            if config.eval_every and step % config.eval_every == 0 and step < config.train_steps:
                ev = evaluate(trainer, state["params"], data_dir, config)
                writer.write(step, {f"eval_{k}": v for k, v in ev.items()})
            if stop:
                if chief:
                    print(f"preemption requested: saved step {step}, exiting")
                ckpt.wait()
                writer.close()
                ckpt.close()
                return {"preempted_at": step}
    ckpt.wait()
    result = evaluate(trainer, state["params"], data_dir, config)
    writer.write(step, {f"eval_{k}": v for k, v in result.items()})
    writer.close()
    ckpt.close()
    if chief:
        print("eval: " + json.dumps({k: round(v, 4) for k, v in result.items()}))
    return result


def _to_float(v):
    a = np.asarray(v)
    return float(a) if a.ndim == 0 else a.astype(float).tolist()


def _stop_if_nonfinite(config, state, trainer, ckpt):
    msg = _first_nonfinite(state, trainer)
    if msg is None or config.nonfinite == "skip":
        return
    ckpt.wait()
    raise FloatingPointError(f"training stopped at {msg}; no checkpoint was written after it.")


def _init_from(path: str, trainer, abstract) -> dict:
    """Fresh optimizer state around parameters restored from an Orbax checkpoint folder."""
    from qwen3next_jax.training.checkpointing import restore_params

    params = restore_params(path, abstract["params"])
    state = trainer.init()
    state["params"] = params
    return state
