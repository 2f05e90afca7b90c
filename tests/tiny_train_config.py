"""A tiny train/export config for the trainer tests (teacher and pairs given by flags)."""

from d2g_jax import config_defaults


def get_config():
  config = config_defaults.base()
  config.stages = "train"
  config.loss.name = "mse"
  config.train.num_steps = 8
  config.train.batch_size = 8
  config.train.g_lr = 1e-4
  config.train.d_lr = 1e-4
  config.train.warmup_steps = 2
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  config.train.sample_every = 0
  config.train.num_samples = 2
  config.objective.r1_interval = 4
  config.sharding.min_size = 256
  return config


def override(config, **values):
  """Sets dotted keys, e.g. override(config, **{"train.num_steps": 2}); returns config."""
  for key, value in values.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
