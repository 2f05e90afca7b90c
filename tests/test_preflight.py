"""Preflight (d2g_jax/preflight.py): every input of the requested stages checked at once,
before anything starts; what an earlier stage of the same run writes is not required yet;
a random loss network is refused unless the config allows it."""

import os
import subprocess
import sys

import pytest
import tiny_train_config
from test_configs import load as load_config

from d2g_jax import config_defaults, preflight, run, tiny
from d2g_jax.losses import perceptual

HERE = os.path.dirname(os.path.abspath(__file__))


def problems(config) -> dict[str, str]:
  """{config key: the problem's text} of a resolved config's preflight ({} if it passes)."""
  config = run.resolve(config)
  try:
    preflight.check(config, run.parse_stages(config.stages))
  except preflight.PreflightError as e:
    return {p.key: str(p) for p in e.problems}
  return {}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  path = tmp_path_factory.mktemp("preflight") / "teacher"
  tiny.build("sd1", str(path))
  return str(path)


def test_sdxl_and_sd15_with_nothing_set_list_every_missing_input(tmp_path):
  config = load_config("sdxl").get_config()
  config.workdir = str(tmp_path)
  found = problems(config)
  # pairs, train, export: train.pairs and the checkpoints are the earlier stages' outputs.
  assert set(found) == {"teacher.path", "pairs.prompts", "loss.weights", "mesh.fsdp"}, found
  assert "no such folder" in found["teacher.path"]
  assert "randomly initialised" in found["loss.weights"]
  assert "loss.allow_random_weights=True" in found["loss.weights"]
  assert "do not divide 8 devices" in found["mesh.fsdp"]  # fsdp 16 on the 8 test devices
  config.stages = "train"  # alone, train needs pairs made before
  assert {"train.pairs", "loss.weights"} <= set(problems(config))

  config = load_config("sd15").get_config()
  config.workdir = str(tmp_path)
  assert "loss.weights" in problems(config)
  config.loss.allow_random_weights = True
  assert "loss.weights" not in problems(config)


def test_demo_passes_from_an_empty_workdir(tmp_path):
  """Its stages make every input (teacher, perceptual data, caches, loss weights, pairs, ...).
  On the 8 test devices only its 500-pair batches do not divide; on one device (the
  demo's laptop CPU) nothing is left."""
  config = load_config("demo").get_config()
  config.workdir = str(tmp_path / "demo")
  assert set(problems(config)) == {"pairs.batch_size"}
  script = ("import importlib.util, sys; from d2g_jax import run, preflight\n"
            f"spec = importlib.util.spec_from_file_location('demo', {HERE!r} + '/../configs/demo.py')\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "c = m.get_config(); c.workdir = sys.argv[1]; c = run.resolve(c)\n"
            "preflight.check(c, run.parse_stages(c.stages)); print('ok')\n")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(HERE))
  out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "demo1")], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
  assert not os.path.exists(tmp_path / "demo") and not os.path.exists(tmp_path / "demo1")


def test_problems_name_their_keys(teacher, tmp_path):
  (tmp_path / "prompts.txt").write_text("a cat\n")
  (tmp_path / "a_file").write_text("")
  config = tiny_train_config.get_config()
  config.workdir = str(tmp_path / "work")
  config.stages = "pairs,train,export,eval"
  config.teacher.path = teacher
  config.pairs.prompts = str(tmp_path / "prompts.txt")
  config.pairs.batch_size = 8
  config.pairs.out_dir = str(tmp_path / "a_file" / "pairs")  # under a file: not writable
  config.loss.name, config.loss.encoder = "e_latent_lpips", "sd3"  # 16 channels, VAE has 4
  config.loss.weights = str(tmp_path)  # a folder without weights
  config.train.batch_size, config.train.microbatches = 16, 4  # 2 rows a device, in 4 parts?
  config.eval.prompts = "tfds:coco_captions"  # no split
  config.eval.diversity_prompts = 2  # measured with E-LatentLPIPS, which has no weights
  found = problems(config)
  assert set(found) == {"pairs.out_dir", "loss.encoder", "loss.weights", "train.batch_size",
                        "eval.student.path", "eval.prompts", "eval.lpips_weights"}, found
  assert "is not a writable folder" in found["pairs.out_dir"]
  assert "16-channel latents" in found["loss.encoder"] and "sd15" in found["loss.encoder"]
  assert "no E-LatentLPIPS weights for encoder 'sd3'" in found["loss.weights"]
  assert "multiple of devices x microbatches" in found["train.batch_size"]
  assert "empty" in found["eval.student.path"] and "not a tfds spec" in found["eval.prompts"]
  assert "eval.allow_random_lpips=True" in found["eval.lpips_weights"]

  # The same run with its inputs fixed, the student being the export stage's folder.
  config.pairs.out_dir = str(tmp_path / "pairs")
  config.loss.encoder, config.loss.allow_random_weights = "sd15", True
  config.loss.weights = ""
  config.train.microbatches = 2
  config.eval.student.path = "{export.out_dir}"
  config.eval.prompts = str(tmp_path / "prompts.txt")
  config.eval.allow_random_lpips = True
  assert problems(config) == {}
  config.stages = "eval"  # alone: the exported student is not there
  assert "no such folder" in problems(config)["eval.student.path"]


def test_a_random_loss_network_is_an_error_unless_allowed():
  cfg = config_defaults.base().loss
  for name, key in (("e_latent_lpips", "loss.weights"), ("latent_lpips", "loss.weights"),
                    ("lpips", "loss.lpips_vgg")):
    cfg.name = name
    with pytest.raises(ValueError, match=f"{key} is empty.*loss.allow_random_weights=True"):
      perceptual.loss_from_config(cfg)
  cfg.name, cfg.allow_random_weights = "e_latent_lpips", True
  with pytest.warns(RuntimeWarning, match="RANDOMLY"):
    perceptual.loss_from_config(cfg)
