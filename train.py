"""Pretrain a Qwen3-Next-style model.

    python train.py                                            # configs/default.py -> runs/default
    python train.py --config=configs/X.py[:arg] --workdir=DIR --config.a.b=value ...

Resumes from DIR/checkpoints when present. See README.md for configs, data and multi-host launch.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from qwen3next_jax.training.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file (get_config).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory (checkpoints, metrics).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and JAX are chatty at INFO
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
