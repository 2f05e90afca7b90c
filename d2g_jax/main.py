"""Entry point: one config, one or more stages.

    python -m d2g_jax.main --config configs/demo.py
    python -m d2g_jax.main --config configs/sd15.py --config.teacher.path=/models/sd15 \
        --config.stages=pairs

Kept short on purpose: flags in, `run.run(config)` out. See configs/ for every option.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from d2g_jax import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every step at INFO
    logging.set_verbosity(logging.WARNING)
  run.run(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
