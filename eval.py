"""Evaluate a checkpoint, or continue a prompt with it.

    python eval.py --workdir=DIR [--config=configs/X.py] [--step=N] [--hf_dir=HF]
        restores the newest (or step N) checkpoint of DIR (or HF weights), evaluates loss,
        perplexity, bits per byte and MTP accuracy/acceptance on the held-out split, writes
        DIR/eval.json and prints a table.
    python eval.py --workdir=DIR --mode=generate --prompt="def f(" [--max_new_tokens=64]
        [--temperature=0] [--top_p=1] [--mtp_draft_tokens=0] [--seed=0]
        prints the continuation, tokenized with the corpus tokenizer recorded in DIR/config.json.

Without --config the config is DIR/config.json (the resolved config the run was trained with).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (default: WORKDIR/config.json).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Evaluate Hugging Face weights from this folder.")
_MODE = flags.DEFINE_enum("mode", "eval", ["eval", "generate"], "What to do.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text for --mode=generate.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_DRAFT = flags.DEFINE_integer("mtp_draft_tokens", 0, "MTP speculative draft tokens per step.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")

# Keys the training loop adds to config.json that are not part of the experiment config.
_RECORDED_ONLY = ("data_dir", "model_resolved")


def _load_config(workdir: str):
    import ml_collections

    if _CONFIG.value is not None:
        return _CONFIG.value, None
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise app.UsageError(f"{path} does not exist; pass --config=configs/X.py.")
    with open(path) as f:
        d = json.load(f)
    recorded = {k: d.pop(k) for k in _RECORDED_ONLY if k in d}
    return ml_collections.ConfigDict(d), recorded.get("data_dir")


@contextlib.contextmanager
def _quiet_background_failures():
    """A restore that fails (say on shapes) tears Orbax's asyncio workers down mid-flight: their
    future callbacks then hit a closed event loop and print tracebacks, from other threads and at
    any moment, that would bury our one-sentence error. Mute those channels meanwhile."""
    futures_log = logging.getLogger("concurrent.futures")
    saved = (futures_log.level, threading.excepthook, sys.excepthook, sys.unraisablehook)
    futures_log.setLevel(logging.CRITICAL + 1)
    threading.excepthook = lambda args: None
    # Native (tensorstore) threads report a failing Python callback through sys.excepthook.
    sys.excepthook = lambda *args: None
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        futures_log.setLevel(saved[0])
        threading.excepthook, sys.excepthook, sys.unraisablehook = saved[1:]


def _restore(config, workdir, trainer):
    """(step, params) from the checkpoint, or from --hf_dir."""
    from flax import nnx

    if _HF_DIR.value:
        import jax.numpy as jnp

        from qwen3next_jax.hf import from_hf

        try:
            model = from_hf(_HF_DIR.value, dtype=jnp.dtype(trainer.model_cfg.param_dtype))
        except (OSError, ValueError, KeyError) as e:
            raise app.UsageError(
                f"cannot load Hugging Face weights from {_HF_DIR.value}: {e}"
            ) from None
        if model.cfg != trainer.model_cfg:
            trainer = _rebuild_for(config, model.cfg)
        return 0, nnx.state(model, nnx.Param), trainer

    from qwen3next_jax.config import ConfigError
    from qwen3next_jax.training import checkpointing, train_step

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise app.UsageError(f"{workdir} has no checkpoints/ folder; train first or pass --hf_dir.")
    ckpt = checkpointing.Checkpointer(ckpt_dir, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise app.UsageError(f"{ckpt_dir} holds no finished checkpoint.")
        if _STEP.value is not None and _STEP.value not in steps:
            raise app.UsageError(f"step {_STEP.value} is not among the checkpoints {steps}.")
        abstract = train_step.abstract_with_shardings(trainer)
        try:
            ckpt.check_compatible(abstract, steps[-1] if _STEP.value is None else _STEP.value)
        except ConfigError as e:
            raise app.UsageError(str(e)) from None
        with _quiet_background_failures():
            try:
                restored = ckpt.restore(abstract, step=_STEP.value)
            except Exception as e:  # noqa: BLE001 - unreadable files surface as many types
                msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                # A failed Orbax restore leaves its asyncio workers half torn down; they print
                # tracebacks from other threads until (and during) shutdown: exit at once, muted.
                sys.stderr.write(f"eval.py: the checkpoint in {ckpt_dir} cannot be read ({msg}).\n")
                sys.stderr.flush()
                os._exit(1)
    finally:
        ckpt.close()
    step, state, _, _ = restored
    return step, state["params"], trainer


def _rebuild_for(config, model_cfg):
    from qwen3next_jax import sharding
    from qwen3next_jax.training import train_step

    for k, v in model_cfg.to_dict().items():
        config.model[k] = tuple(v) if isinstance(v, list) else v
    return train_step.build(config, sharding.mesh_from_config(config))


def _print_table(rows: dict) -> None:
    width = max(len(k) for k in rows)
    print(f"| {'metric':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for k, v in rows.items():
        print(f"| {k:<{width}} | {v:.6g} |" if isinstance(v, float) else f"| {k:<{width}} | {v} |")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdir = _WORKDIR.value
    if not workdir:
        raise app.UsageError("--workdir is required.")
    if not os.path.isdir(workdir) and not _HF_DIR.value:
        raise app.UsageError(f"--workdir={workdir} does not exist.")
    if _MODE.value == "generate" and not _PROMPT.value:
        raise app.UsageError("--mode=generate needs --prompt.")
    if _MAX_NEW.value < 1 or _DRAFT.value < 0 or _TEMPERATURE.value < 0:
        raise app.UsageError(
            "--max_new_tokens must be >= 1, --mtp_draft_tokens >= 0 and --temperature >= 0."
        )
    if not 0.0 < _TOP_P.value <= 1.0:
        raise app.UsageError(f"--top_p={_TOP_P.value} must be in (0, 1].")

    from flax import nnx

    from qwen3next_jax import sharding
    from qwen3next_jax.training import train_step
    from qwen3next_jax.training.evaluate import evaluate
    from qwen3next_jax.training.loop import resolve_data_dir

    config, data_dir = _load_config(workdir)
    try:
        mesh = sharding.mesh_from_config(config)
        trainer = train_step.build(config, mesh)
    except (ValueError, KeyError, AttributeError) as e:
        raise app.UsageError(f"the config is not usable: {e}") from None
    data_dir = data_dir or resolve_data_dir(config)
    step, params, trainer = _restore(config, workdir, trainer)

    if _MODE.value == "generate":
        from qwen3next_jax.data import pipeline
        from qwen3next_jax.inference.generate import generate

        tok = pipeline.corpus_tokenizer(data_dir)
        model = nnx.merge(trainer.graphdef, params)
        prompt_ids = tok.encode(_PROMPT.value)
        if not prompt_ids:
            raise app.UsageError("--prompt encodes to no tokens.")
        if _DRAFT.value and not model.cfg.num_mtp_layers:
            raise app.UsageError("--mtp_draft_tokens needs a model with MTP heads.")
        t0 = time.perf_counter()
        ids, stats = generate(
            model,
            [prompt_ids],
            max_new_tokens=_MAX_NEW.value,
            temperature=_TEMPERATURE.value,
            top_p=_TOP_P.value,
            mtp_draft_tokens=_DRAFT.value,
            seed=_SEED.value,
            eos_id=tok.eos_id,
            return_stats=True,
        )
        dt = time.perf_counter() - t0
        new = [int(t) for t in ids[0, len(prompt_ids) :]]
        if tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        print(_PROMPT.value + tok.decode(new))
        print(
            f"[step {step}: {len(new)} tokens in {dt:.2f} s incl. compile; "
            f"{stats['mean_accepted_per_step']:.2f} drafts accepted per forward]",
            file=sys.stderr,
        )
        return

    t0 = time.perf_counter()
    result = evaluate(trainer, params, data_dir, config)
    result = {"step": int(step), **result, "eval_seconds": time.perf_counter() - t0}
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")
    _print_table(result)


if __name__ == "__main__":
    app.run(main)
