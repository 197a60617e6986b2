"""Pretrain a Qwen3-Next-style model.

    python train.py                                            # configs/default.py -> runs/default
    python train.py --config=configs/X.py[:arg] --workdir=DIR --config.a.b=value ...
    python train.py --config=configs/X.py --workdir=DIR --aot_topology=v5p:8x8x8   # compile only

Resumes from DIR/checkpoints when present. See README.md for configs, data and multi-host launch.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file (get_config).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory (checkpoints, metrics).")
_AOT_TOPOLOGY = flags.DEFINE_string(
    "aot_topology",
    None,
    "Compile the train step for this TPU topology (e.g. v5p:8x8x8, v6e:16x16) without running "
    "it; writes WORKDIR/aot_report.json. Needs jax[tpu] installed; any host works.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and JAX are chatty at INFO
    if _AOT_TOPOLOGY.value:
        import jax

        # The host compiles, it does not run: keep JAX off any local accelerator (and libtpu
        # from probing for a TPU) unless the user chose platforms explicitly.
        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")
        from qwen3next_jax.training import aot

        try:
            aot.run(_CONFIG.value, _WORKDIR.value, _AOT_TOPOLOGY.value)
        except aot.AotError as e:
            sys.exit(f"error: {e}")
        return
    from qwen3next_jax.config import ConfigError
    from qwen3next_jax.training.loop import train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    # Bad input is one sentence; a traceback here would only bury it.
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
