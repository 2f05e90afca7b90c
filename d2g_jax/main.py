"""Entry point: one config, one or more stages.

    python -m d2g_jax.main --config configs/demo.py
    python -m d2g_jax.main --config configs/sd15.py --config.teacher.path=/models/sd15 \
        --config.stages=pairs

Kept short on purpose: flags in, `run.run(config)` out. See configs/ for every option.
"""

from absl import app, flags
from ml_collections import config_flags

from d2g_jax import log, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our logger on process 0; Orbax's / grain's INFO narration dropped unless asked for.
  log.setup(filter_libraries=not flags.FLAGS["verbosity"].present)
  run.run(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
