"""Checkpointer: sharded round trip on 8 fake devices, exact grain position, torn saves
ignored, and exact resume of a toy training run killed with SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from d2g_jax import parallel
from d2g_jax.infra import checkpoint

sys.path.insert(0, os.path.dirname(__file__))
import resume_worker  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")


def sharded_state(mesh):
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  return {
      "params": {"w": put(jnp.arange(8 * 12, dtype=jnp.float32).reshape(8, 12), P("fsdp", "data")),
                 "v": put(jnp.linspace(-1, 1, 16 * 4).reshape(16, 4).astype(jnp.bfloat16),
                          P(None, "fsdp")),
                 "b": put(jnp.ones(8, jnp.float32), P())},
      "step": put(jnp.int32(7), P()),
      "rng": put(jax.random.key(3), P()),
  }


def test_sharded_round_trip_into_another_sharding(tmp_path):
  state = sharded_state(parallel.make_mesh({"data": 2, "fsdp": 4}))
  assert state["params"]["w"].addressable_shards[0].data.shape == (2, 6)  # really split
  want = jax.device_get({**state, "rng": jax.random.key_data(state["rng"])})
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state)
    jax.tree.map(lambda x: x.delete(), state)  # save copied to host before returning
    ckpt.wait()
    assert "state" in os.listdir(tmp_path / "ckpt" / "7")

  # Restore onto a 4 x 2 mesh with other specs: each array read straight into its shards.
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  specs = {"params": {"w": P("data"), "v": P("fsdp", None), "b": P("data")},
           "step": P(), "rng": P()}
  shapes = jax.eval_shape(lambda: sharded_state(mesh))
  abstract = jax.tree.map(
      lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
      shapes, specs)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
    got = ckpt.restore(7, abstract)
  for x, target in zip(jax.tree.leaves(got), jax.tree.leaves(abstract)):
    assert (x.shape, x.dtype, x.sharding) == (target.shape, target.dtype, target.sharding)
    for shard in x.addressable_shards:  # each device holds only its part
      assert shard.data.shape == target.sharding.shard_shape(x.shape)
  assert got["params"]["w"].addressable_shards[0].data.shape == (2, 12)
  got = jax.device_get({**got, "rng": jax.random.key_data(got["rng"])})
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_restore_errors(tmp_path):
  mesh = parallel.make_mesh({"data": 8})
  state = {"w": jax.device_put(jnp.ones((8, 2)), NamedSharding(mesh, P("data")))}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    assert not ckpt.save(1, state)            # existing step kept ...
    assert ckpt.save(1, {"w": state["w"] * 2}, force=True)  # ... unless forced
    ckpt.wait()
    np.testing.assert_array_equal(ckpt.restore(1, checkpoint.abstract_like(state))["w"], 2.0)
    with pytest.raises(ValueError, match=r"ShapeDtypeStruct with a sharding.*\['w'\]"):
      ckpt.restore(1, {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32)})
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 5.*\[1\]"):
      ckpt.restore(5, checkpoint.abstract_like(state))
    with pytest.raises(FileNotFoundError, match="no data iterator state"):
      ckpt.restore(1, checkpoint.abstract_like(state), iter(resume_worker.dataset()))
    wrong = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=state["w"].sharding)}
    with pytest.raises(ValueError, match="does not fit the state"):
      ckpt.restore(1, wrong)


def test_data_iterator_position_and_config(tmp_path):
  state = {"x": jnp.zeros(3)}
  it = iter(resume_worker.dataset())
  for _ in range(7):  # past the first epoch (5 batches)
    next(it)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(7, state, data_iterator=it, config={"lr": 0.1, "name": "toy"})
    want = [next(it) for _ in range(8)]  # advanced while the save may still be writing
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    fresh = iter(resume_worker.dataset())
    ckpt.restore(7, checkpoint.abstract_like(state), data_iterator=fresh)
    assert ckpt.config(7) == {"lr": 0.1, "name": "toy"}
  for a, b in zip(want, [next(fresh) for _ in range(8)]):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_torn_save_is_ignored(tmp_path):
  state = {"x": jnp.arange(4.0)}
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in (2, 4, 6):
      ckpt.save(step, {"x": state["x"] + step})
    assert ckpt.all_steps() == [4, 6]  # bounded by max_to_keep
  # A save of step 8 killed half-way leaves Orbax's temporary folder, never "8/".
  torn = tmp_path / "8.orbax-checkpoint-tmp"
  shutil.copytree(tmp_path / "6", torn)
  shutil.rmtree(torn / "state")
  (torn / "state").mkdir()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 6 and ckpt.all_steps() == [4, 6]
    np.testing.assert_array_equal(ckpt.restore(6, checkpoint.abstract_like(state))["x"],
                                  state["x"] + 6)
    assert ckpt.save(8, state)  # Orbax deletes leftover temporary folders before saving
  assert sorted(os.listdir(tmp_path)) == ["4", "6", "8"]


def _losses(workdir):
  """{step: loss hex}; a restarted run re-logs the steps after its checkpoint (last wins)."""
  out = {}
  for line in (workdir / "losses.jsonl").read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:  # a line cut by the kill
      continue
    out[rec["step"]] = rec["loss"]
  return out


def _worker(workdir, **popen):
  cmd = [sys.executable, WORKER, str(workdir), "--steps", "24", "--every", "4", "--sleep", "0.1"]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       os.environ.get("PYTHONPATH", "")])}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **popen)


def test_exact_resume_after_sigkill(tmp_path):
  ref, run = tmp_path / "ref", tmp_path / "run"
  proc = _worker(ref)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out

  proc = _worker(run)
  seen, deadline = [], time.time() + 120
  for line in proc.stdout:
    seen.append(line)
    if line.strip() == "step 14" or time.time() > deadline:
      break
  proc.send_signal(signal.SIGKILL)  # mid-run: checkpoints 4..12 written, 13-14 not saved
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "".join(seen)
  assert "step 14\n" in seen, "".join(seen)
  assert not (run / "final.npz").exists()
  killed_at = max(_losses(run))
  assert 14 <= killed_at < 24

  proc = _worker(run)  # the same command again
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  resumed_from = int(out.split("resumed from step ")[1].split()[0])
  assert 12 <= resumed_from <= killed_at and resumed_from % 4 == 0, out

  assert _losses(run) == _losses(ref)  # every step's loss, bit for bit
  assert sorted(_losses(ref)) == list(range(1, 25))
  want, got = np.load(ref / "final.npz"), np.load(run / "final.npz")
  for k in want.files:
    assert want[k].tobytes() == got[k].tobytes(), k
