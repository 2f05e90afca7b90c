"""run_config: the first run records its config; a restart with another one fails, listing
every differing key, except the keys a restart may change."""

import json
import os

import ml_collections
import pytest

from d2g_jax import config_defaults
from d2g_jax.infra import run_config


def config(**train):
  c = config_defaults.base()
  c.train = ml_collections.ConfigDict({"lr": 1e-4, "num_steps": 100, "log_every": 10,
                                       "betas": (0.9, 0.99), **train})
  return c


def test_first_run_writes_later_runs_check(tmp_path):
  assert not run_config.check_run_config(tmp_path, config())
  run_config.ensure(tmp_path, config())
  path = tmp_path / run_config.FILENAME
  assert json.loads(path.read_text())["train"]["betas"] == [0.9, 0.99]
  assert sorted(os.listdir(tmp_path)) == [run_config.FILENAME]  # no temp file left behind
  # Same config (tuples read back as lists), and changes to keys a restart may change.
  assert run_config.check_run_config(tmp_path, config())
  c = config(num_steps=500, log_every=1)
  c.stages = "train,export"
  run_config.ensure(tmp_path, c)
  assert json.loads(path.read_text())["train"]["num_steps"] == 100  # the first run's record


def test_mismatch_lists_every_key(tmp_path):
  run_config.ensure(tmp_path, config())
  c = config(lr=3e-4, warmup=50, num_steps=7)
  c.seed = 1
  del c.train["log_every"]  # a key gone is a difference too, unless ignored
  with pytest.raises(run_config.ConfigMismatchError) as err:
    run_config.ensure(tmp_path, c)
  msg = str(err.value)
  assert "differs in 3 key(s)" in msg
  assert "train.lr: 0.0001 -> 0.0003" in msg
  assert "train.warmup: '<absent>' -> 50" in msg
  assert "seed: 0 -> 1" in msg
  assert "num_steps" not in msg.split("Keys that may change")[0]
  assert "new workdir" in msg and str(tmp_path / run_config.FILENAME) in msg


def test_ignore_patterns():
  old = {"a": {"b": 1, "c": {"d": 2}}, "e": 3, "f": 4}
  new = {"a": {"b": 5, "c": {"d": 6}}, "e": 7, "f": 4}
  assert run_config.diff(old, new) == [("a.b", 1, 5), ("a.c.d", 2, 6), ("e", 3, 7)]
  assert run_config.diff(old, new, ignore=("a",)) == [("e", 3, 7)]  # a whole block
  assert run_config.diff(old, new, ignore=("a.*.d", "e")) == [("a.b", 1, 5)]  # fnmatch
  assert run_config.diff(old, new, ignore=("a.b*",)) == [("a.c.d", 2, 6), ("e", 3, 7)]
