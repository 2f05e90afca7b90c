"""The errors a user can cause, through the real command line: one readable `error:` message
on stderr, no Python traceback, exit status 2 for a config or input error and 1 for a run
that failed while running (a non-finite loss); --debug adds the traceback."""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tiny_train_config
from PIL import Image

from d2g_jax import config_defaults, run
from d2g_jax.data import shards
from d2g_jax.infra import run_config
from d2g_jax.lock import FolderLock

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TINY = f"--config={HERE}/tiny_train_config.py"


def cli(*args, timeout=300):
  """(status, stderr) of `python -m d2g_jax.main *args`, as the test session runs JAX."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             PYTHONPATH=REPO)
  env.pop("D2G_DEBUG", None)
  out = subprocess.run([sys.executable, "-m", "d2g_jax.main", *args], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
  return out.returncode, out.stderr


def assert_clean(status, stderr, want_status, *fragments):
  assert status == want_status, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  assert stderr.count("error: ") == 1, stderr[-3000:]
  message = stderr[stderr.index("error: "):]
  for fragment in fragments:
    assert fragment in message, (fragment, message)


# The GDD recipe on real latents at toy size: the cheapest run that reads a dataset.
GDD = {"train.recipe": "gdd", "objective.regression_weight": 0.0, "objective.gan_weight": 1.0,
       "objective.mix_fraction": 0.0, "discriminator.z_cond": False, "objective.r1_gamma": 0.0,
       "real.batch_size": 8, "real.shard_size": 8, "real.workers": 1}


def flags(values: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A tiny SD 1 teacher and 8 captioned images encoded by its VAE (real_latents), made by
  the command line itself."""
  root = tmp_path_factory.mktemp("cli")
  rng = np.random.default_rng(0)
  for i in range(8):
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(root / f"{i}.png")
    (root / f"{i}.txt").write_text("a photo of a cat\n")
  status, err = cli(TINY, *flags(real_values(root)), "--config.stages=tiny_teacher,real_latents")
  assert status == 0, err[-3000:]
  return root


def real_values(root, **more) -> dict:
  return {"workdir": root / "work", "teacher.path": root / "teacher",
          "real.images": f"captioned:{root}", "real.out_dir": root / "real_latents",
          **GDD, **more}


def test_flag_mistakes():
  assert_clean(*cli("--no_such_flag=1"), 2, "Unknown command line flag 'no_such_flag'")
  assert_clean(*cli(TINY, "--config.train.batch_sise=8"), 2, "--config.train.batch_sise",
               "no option 'batch_sise'", 'Did you mean "batch_size"')
  assert_clean(*cli(TINY, "--config.train.batch_size=eight"), 2, "--config.train.batch_size")
  assert_clean(*cli("--config=configs/no_such_config.py"), 2, "no_such_config.py: no such file")
  assert_clean(*cli(), 2, "--config is required")
  assert_clean(*cli(TINY, "--config.stages=pairs,trian"), 2, "unknown stage(s) ['trian']")


def test_sdxl_with_nothing_set_lists_every_missing_input_quickly(tmp_path):
  start = time.time()
  status, err = cli("--config=configs/sdxl.py", f"--config.workdir={tmp_path}")
  seconds = time.time() - start
  print(f"preflight of configs/sdxl.py through the CLI: {seconds:.1f} s")
  assert_clean(status, err, 2, "teacher.path=", "no such folder", "pairs.prompts=''",
               "loss.weights=''", "loss.allow_random_weights=True", "nothing was started")
  assert seconds < 30
  assert os.listdir(tmp_path) == []  # not even the workdir's lock


def test_missing_and_malformed_inputs(root, tmp_path):
  pairs = ["--config.stages=pairs", f"--config.workdir={tmp_path}",
           f"--config.pairs.out_dir={tmp_path / 'pairs'}", "--config.pairs.batch_size=8"]
  assert_clean(*cli(TINY, *pairs, f"--config.teacher.path={root / 'teacher'}",
                    f"--config.pairs.prompts={tmp_path / 'missing.txt'}"),
               2, "pairs.prompts=", "missing.txt': no such file")
  broken = tmp_path / "broken_teacher"  # a pipeline folder whose model_index.json is cut short
  shutil.copytree(root / "teacher", broken)
  (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
  (tmp_path / "prompts.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"\n')
  assert_clean(*cli(TINY, *pairs, f"--config.teacher.path={broken}",
                    f"--config.pairs.prompts={tmp_path / 'prompts.jsonl'}"),
               2, "teacher.path=", "model_index.json", "is not valid JSON")
  # A malformed prompt file is found by the stage itself (preflight only sees that it exists).
  status, err = cli(TINY, *pairs, f"--config.teacher.path={root / 'teacher'}",
                    f"--config.pairs.prompts={tmp_path / 'prompts.jsonl'}")
  assert_clean(status, err, 2, "prompts.jsonl:2: not valid JSON")
  status, err = cli(TINY, *pairs, f"--config.teacher.path={root / 'teacher'}",
                    f"--config.pairs.prompts={tmp_path / 'prompts.jsonl'}", "--debug")
  assert status == 2 and "Traceback" in err and "error: " in err  # --debug: the traceback too


def test_corrupt_shard(root, tmp_path):
  copy = tmp_path / "real_latents"
  shutil.copytree(root / "real_latents", copy)
  shard = copy / shards.read_manifest(str(copy), shards.LATENTS)["shards"][0]["name"]
  with open(shard, "r+b") as fh:
    fh.truncate(os.path.getsize(shard) // 2)
  status, err = cli(TINY, *flags(real_values(root, **{"real.out_dir": copy})),
                    "--config.stages=real_latents")
  assert_clean(status, err, 2, f"shard {shard}", "bytes")


def test_config_changed_on_resume(root, tmp_path):
  values = real_values(root, **{"workdir": tmp_path, "stages": "train"})
  config = tiny_train_config.override(tiny_train_config.get_config(),
                                      **{k: str(v) if isinstance(v, os.PathLike) else v
                                         for k, v in values.items()})
  started = run.resolve(config).to_dict()
  started["objective"]["gan_weight"] = 0.5  # the first run of this workdir had another weight
  run_config.save_run_config(str(tmp_path), started)
  assert_clean(*cli(TINY, *flags(values)), 2, "was started with a different config",
               "objective.gan_weight: 0.5 -> 1.0")


def test_locked_workdir(root, tmp_path):
  with FolderLock(str(tmp_path)):  # a run that is alive holds the workdir
    assert_clean(*cli(TINY, f"--config.workdir={tmp_path}", "--config.stages=tiny_teacher",
                      f"--config.teacher.path={root / 'teacher'}"),
                 2, f"{tmp_path} is in use by another run")


def test_non_finite_loss_stops_with_status_1(tmp_path):
  """The digits demo's VAE at a learning rate of 1e30: its loss is NaN by step 2."""
  status, err = cli("--config=configs/demo.py", f"--config.workdir={tmp_path}",
                    "--config.stages=digits_vae", "--config.digits.vae.steps=3",
                    "--config.digits.vae.lr=1e30", "--config.compilation_cache_dir=")
  assert_clean(status, err, 1, "metric 'loss' is nan (not finite); training stopped")


def test_defaults_refuse_random_loss_weights():
  assert config_defaults.base().loss.allow_random_weights is False
  assert config_defaults.base().eval.allow_random_lpips is False
