"""The digits demo (configs/demo.py) end to end at toy size: every stage runs once, in order,
through the same code as the full demo; metrics.json has the keys scripts read; demo.png has
one labelled row per digit; the exported folder samples in diffusers (the report checks it against
our generator); a second run redoes nothing.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image
from test_digits_teacher import tiny_config as tiny_teacher
from tiny_train_config import override

from d2g_jax import run

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = ["accuracy.teacher_50", "accuracy.teacher_1", "accuracy.student_1",
        "diversity.teacher_50", "diversity.teacher_1", "diversity.student_1",
        "distance_to_teacher.before", "distance_to_teacher.after", "seconds.total"]


def demo_config(workdir: str):
  spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(HERE, "..", "configs",
                                                                          "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  # The teacher stages at the size of test_digits_teacher, the rest a few steps each.
  small = tiny_teacher(workdir)
  config.digits = small.digits
  config.digits.check_per_digit = 1
  config.workdir = workdir
  return override(config, **{
      "latent_vgg.widths": (4, 4, 8, 8, 8),
      "latent_vgg.cache.image_size": 16, "latent_vgg.cache.bapps_image_size": 16,
      "latent_vgg.cache.batch_size": 8, "latent_vgg.cache.workers": 1,
      "latent_vgg.train.batch_size": 8, "latent_vgg.train.num_steps": 3,
      "latent_vgg.train.eval_batch_size": 40,
      "latent_vgg.calibrate.batch_size": 8, "latent_vgg.calibrate.epochs": 1,
      "latent_vgg.calibrate.decay_epochs": 1, "latent_vgg.calibrate.feature_batch_size": 8,
      "demo.twoafc_per_family": 2, "demo.samples_per_digit": 2, "demo.columns": 2,
      "demo.lpips_draws": 1,
      "pairs.num_pairs": 16, "pairs.num_steps": 2, "pairs.batch_size": 8, "pairs.shard_size": 8,
      "train.num_steps": 2, "train.batch_size": 8, "train.warmup_steps": 1,
      "train.checkpoint_every": 2, "train.log_every": 1, "train.sample_every": 0,
      "train.num_samples": 2, "objective.r1_interval": 2,
      "compilation_cache_dir": "",
  })


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_demo_runs_every_stage_then_reuses_them(tmp_path, capsys):
  config = demo_config(str(tmp_path))
  run.run(config)
  metrics = json.load(open(tmp_path / "metrics.json"))
  for key in KEYS:
    group, name = key.split(".")
    assert np.isfinite(metrics[group][name]), key
  for name in ("teacher_50", "teacher_1", "student_1"):
    assert 0 <= metrics["accuracy"][name] <= 1
  # The exported folder, sampled by diffusers' pipeline in one step, gives our student's latents.
  assert metrics["export_check_max_rel_error"] < 1e-4
  assert set(metrics["seconds"]) >= set(config.stages.split(",")) | {"total"}
  picture = np.asarray(Image.open(tmp_path / "demo.png"))
  rows, cols = 10, 3 * config.demo.columns
  cell = 16 * config.demo.zoom  # 16 px digits, zoomed, with 1 px borders (zoomed) between
  assert picture.shape[0] >= rows * cell and picture.shape[1] >= cols * cell
  assert picture.shape[0] < picture.shape[1] * rows / cols * 1.1  # rows x columns as described
  # Labelled: white margins with dark text above the columns (the samplers) and left of the rows.
  for margin in (picture[:12], picture[:, :12]):
    assert (margin > 200).all(-1).mean() > 0.9 and (margin < 100).all(-1).any()
  # The report's last words: the command that opens the web page on this demo's student.
  from d2g_jax.demo import report
  assert report.app_command(run.resolve(config)).startswith(
      f"python -m d2g_jax.app --model {tmp_path}/export --teacher {tmp_path}/teacher ")

  # A second run: every stage finds its result and keeps it (no file rewritten but the
  # run's bookkeeping).
  before = mtimes(tmp_path)
  run.run(config)
  after = mtimes(tmp_path)
  assert set(after) == set(before)
  changed = sorted(p for p in after if after[p] != before[p])
  assert changed == ["stage_seconds.json"], changed


def mtimes(root) -> dict:
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
  return out


def test_perceptual_data_is_kept_or_refused_never_replaced(tmp_path):
  """digits_lpips_data: a rerun keeps the folder; other settings are refused (the latent
  caches made from the old folder would be stale), and the old folder survives."""
  config = run.resolve(demo_config(str(tmp_path)))
  config.stages = "digits_lpips_data"
  run.run(config)
  root = tmp_path / "digits" / "perceptual_data"
  assert sorted(os.listdir(root / "train")) == [str(d) for d in range(10)]
  assert (root / "bapps" / "2afc" / "val").is_dir()
  before = mtimes(root)
  run.run(config)
  assert mtimes(root) == before
  config.demo.twoafc_per_family = 3
  with pytest.raises(ValueError, match=r"other settings \(differing: \['per_family'\]\)"):
    run.run(config)
  assert mtimes(root) == before
