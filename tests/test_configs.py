"""The shipped configs: each loads, starts its docstring with its command, is locked after
resolving, and its train section fits its mesh."""

import importlib.util
import os

import pytest

from d2g_jax import run

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NAMES = sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith(".py"))


def load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", NAMES)
def test_config(name):
  module = load(name)
  assert module.__doc__.strip().startswith(f"python -m d2g_jax.main --config configs/{name}.py") \
      or f"python -m d2g_jax.main --config configs/{name}.py" in module.__doc__.split("\n\n")[1]
  config = run.resolve(module.get_config())
  run.parse_stages(config.stages)
  assert config.train.pairs and config.export.out_dir
  with pytest.raises(AttributeError):
    config.train.learning_rate = 1.0  # locked: a typo fails instead of adding a key
  mesh = [config.mesh.data, config.mesh.fsdp]
  assert mesh.count(-1) <= 1
  fixed = abs(mesh[0] * mesh[1])
  assert config.train.batch_size % fixed == 0


def test_sd15_cfg8():
  assert load("sd15").get_config("cfg8").pairs.guidance_scale == 8.0
  assert load("sd15").get_config().pairs.guidance_scale == 3.0
