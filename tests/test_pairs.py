"""Pair stage: end to end on 8 fake devices, resume after SIGKILL, two real hosts, grain
reading, corrupt shards and config mismatches. The fake teacher is in pairs_worker.py."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pairs_worker as W
import pytest

from d2g_jax import files, parallel
from d2g_jax.data import pairs, shards, source

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pairs_worker.py")
NUM, SHARD = 64, 16  # pairs_worker.run defaults: 4 shards, global batch 8, seed 7
READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)  # small: 2 CPU cores


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted in-process run (8 fake devices)."""
  out = str(tmp_path_factory.mktemp("reference") / "pairs")
  return out, W.run(out)


def records(folder):
  src = source.PairSource(folder)
  return [src[i] for i in range(len(src))]


def assert_same_records(got, want):
  assert [r["index"] for r in got] == [r["index"] for r in want]
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], np.ndarray):
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"pair {a['index']} key {k}")
      else:
        assert a[k] == b[k], (a["index"], k)


def shard_files(folder):
  return sorted(f for f in os.listdir(folder) if f.endswith(".array_record"))


def sidecars(folder):
  return sorted(f for f in os.listdir(folder) if f.startswith("pairs-") and f.endswith(".json"))


def temps(folder):
  return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


def worker(out, *args, log=None):
  cmd = [sys.executable, WORKER, str(out), *map(str, args)]
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


# ------------------------------------------------------------------ planning
def test_plan_ownership_and_chunks():
  assert pairs.owned_shards(10, 1, 3) == [1, 4, 7]
  assert sorted(sum((pairs.owned_shards(10, h, 3) for h in range(3)), [])) == list(range(10))
  C = pairs.Chunk
  # Batches never straddle shards; the last shard (37 pairs, shards of 16) is short.
  assert pairs.plan_chunks([0, 2], 16, 37, 8) == [C(0, 0, 8), C(0, 8, 16), C(2, 32, 37)]
  assert pairs.plan_chunks([1], 16, 37, 6) == [C(1, 16, 22), C(1, 22, 28), C(1, 28, 32)]


def test_mesh_and_batch_sharding():
  mesh = parallel.make_mesh()
  assert dict(mesh.shape) == {"data": 8}
  assert parallel.local_batch_size(16, mesh) == 16
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    parallel.local_batch_size(12, mesh)
  x = parallel.host_to_global(np.arange(16.0).reshape(8, 2), mesh)
  assert len(x.sharding.device_set) == 8
  assert {s.data.shape for s in x.addressable_shards} == {(1, 2)}
  np.testing.assert_array_equal(parallel.global_to_host(x, mesh), np.arange(16.0).reshape(8, 2))
  mesh2 = parallel.make_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh2.shape) == {"data": 2, "fsdp": 4} and parallel.batch_size_divisor(mesh2) == 8


# ------------------------------------------------------------------ end to end
def test_end_to_end(reference):
  out, manifest = reference
  assert manifest["status"] == "complete"
  assert (manifest["num_examples"], manifest["num_shards"]) == (NUM, 4)
  assert manifest["config"]["meta"] == {"teacher": "fake", "guidance": 3.0, "steps": 3,
                                        "resolution": 64}
  assert [s["num_records"] for s in manifest["shards"]] == [SHARD] * 4
  assert manifest["record"]["x"] == "float32[8, 8, 4]"
  assert manifest["record"]["prompt_embeds"] == "float16[6, 8]"
  for info in manifest["shards"]:
    assert files.file_sha256(os.path.join(out, info["name"])) == info["sha256"]
  assert temps(out) == []

  got = records(out)
  assert [r["index"] for r in got] == list(range(NUM))  # every pair exactly once, in order
  assert [r["prompt"] for r in got] == W.prompts(NUM)
  assert {r["seed"] for r in got} == {7}
  # z: regenerated alone, bitwise.
  for i in (0, 37, NUM - 1):
    np.testing.assert_array_equal(got[i]["z"], pairs.pair_noise(7, i, W.LATENT))
  z = jnp.stack([r["z"] for r in got])
  # x & co: the fake teacher on one device, unsharded, on the whole set at once.
  cond = W.fake_encode(W.prompts(NUM))
  want = jax.jit(W.fake_generate)(W.fake_params(), z, cond)
  np.testing.assert_array_equal(np.stack([r["input_ids"] for r in got]), cond["input_ids"])
  for k, v in want.items():
    stored = np.stack([r[k] for r in got])
    assert stored.dtype == v.dtype, k
    np.testing.assert_allclose(stored.astype(np.float32), np.asarray(v, np.float32),
                               rtol=1e-6, atol=1e-6, err_msg=k)


def test_padding_and_short_last_shard(tmp_path):
  # 21 pairs, shards of 6 (not a multiple of the batch): padded last batches are dropped.
  m = W.run(str(tmp_path / "p"), num=21, shard_size=6, batch_size=8)
  assert [s["num_records"] for s in m["shards"]] == [6, 6, 6, 3]
  got = records(str(tmp_path / "p"))
  assert [r["index"] for r in got] == list(range(21))
  assert [r["prompt"] for r in got] == W.prompts(21)


def test_grain_dataset(reference):
  out, _ = reference
  # Two hosts, one epoch: disjoint shares that cover every pair.
  seen = []
  for host in range(2):
    ds = source.pair_dataset(out, batch_size=4, seed=1, num_epochs=1, process_index=host,
                             process_count=2)
    batches = list(ds.to_iter_dataset(READ))
    assert all(b["z"].shape == (4, 8, 8, 4) and b["prompt"].shape == (4,) for b in batches)
    seen.append(np.concatenate([b["index"] for b in batches]))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(NUM))
  assert list(seen[0]) != sorted(seen[0])  # shuffled

  # The iterator's state resumes exactly where it was.
  ds = source.pair_dataset(out, batch_size=4, seed=1, process_index=0, process_count=1)
  it = iter(ds.to_iter_dataset(READ))
  for _ in range(3):
    next(it)
  state = it.get_state()
  after = [next(it)["index"] for _ in range(20)]  # crosses the epoch boundary (16 batches)
  it2 = iter(ds.to_iter_dataset(READ))
  it2.set_state(state)
  assert all(np.array_equal(a, next(it2)["index"]) for a in after)
  # Each epoch (16 batches) is a new permutation of all pairs.
  it3 = iter(ds.to_iter_dataset(READ))
  epochs = [np.concatenate([next(it3)["index"] for _ in range(16)]) for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(NUM))
  assert list(epochs[0]) != list(epochs[1])


# ------------------------------------------------------------------ resume
def test_resume_after_sigkill(reference, tmp_path):
  ref_out, ref_manifest = reference
  out = tmp_path / "pairs"
  log_path = tmp_path / "run1.log"
  # 8 steps (4 shards of 2 batches); 0.3 s per batch keeps it mid-run long enough.
  command = ["--sleep", "0.3"]
  with open(log_path, "w") as log:
    proc = worker(out, *command, log=log)
    second_shard_tmp = "." + shards.shard_name(1, 4) + ".tmp"
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
      if out.is_dir() and shards.sidecar_name(0, 4) in os.listdir(out) \
          and second_shard_tmp in os.listdir(out):
        break
      time.sleep(0.02)
    else:
      proc.kill()
      pytest.fail(f"worker did not reach shard 1 (rc {proc.returncode}):\n{log_path.read_text()}")
    proc.send_signal(signal.SIGKILL)  # mid-shard: shard 0 complete, shard 1 half written
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  done = sidecars(out)
  assert 1 <= len(done) < 4, done
  assert second_shard_tmp in temps(out)  # the half-written shard 1
  finished = done + [f.replace(".json", ".array_record") for f in done]
  kept = {f: os.stat(out / f).st_ino for f in finished}
  assert json.loads((out / shards.MANIFEST).read_text())["status"] == "in_progress"
  with pytest.raises(shards.ShardError, match="not complete"):
    source.PairSource(str(out))

  # The same command again: continues, and the result equals the uninterrupted run.
  with open(tmp_path / "run2.log", "w") as log:
    rc = worker(out, *command, log=log).wait(timeout=300)
  assert rc == 0, (tmp_path / "run2.log").read_text()
  assert temps(out) == [] and len(sidecars(out)) == 4
  assert {f: os.stat(out / f).st_ino for f in finished} == kept  # finished shards not redone
  manifest = shards.read_manifest(str(out))
  assert manifest["status"] == "complete"
  assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in ref_manifest["shards"]]
  assert_same_records(records(str(out)), records(ref_out))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_hosts(reference, tmp_path):
  """Two real JAX processes of 4 CPU devices each (gloo): each writes its own shards."""
  ref_out, ref_manifest = reference
  out = tmp_path / "pairs"
  port = _free_port()
  logs = [open(tmp_path / f"host{i}.log", "w") for i in range(2)]
  procs = [worker(out, "--devices", 4, "--num-processes", 2, "--process-id", i, "--port", port,
                  log=logs[i]) for i in range(2)]
  try:
    rcs = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for f in logs:
      f.close()
  assert rcs == [0, 0], "\n".join((tmp_path / f"host{i}.log").read_text()[-3000:] for i in range(2))
  hosts = [json.loads((out / shards.sidecar_name(s, 4)).read_text())["host"] for s in range(4)]
  assert hosts == [0, 1, 0, 1]  # shard s belongs to host s % 2
  # Per-host batches of 4 instead of 8: the same pairs, bit for bit.
  assert_same_records(records(str(out)), records(ref_out))
  assert shards.read_manifest(str(out))["shards"] == ref_manifest["shards"]


# ------------------------------------------------------------------ integrity
def _copy(reference, tmp_path):
  out = tmp_path / "pairs"
  shutil.copytree(reference[0], out)
  return out


def test_truncated_shard(reference, tmp_path):
  out = _copy(reference, tmp_path)
  bad = out / shards.shard_name(2, 4)
  os.truncate(bad, bad.stat().st_size // 2)
  with pytest.raises(shards.ShardError, match=f"{bad.name}.*truncated"):
    source.PairSource(str(out))
  with pytest.raises(shards.ShardError, match=f"{bad.name}.*truncated"):
    W.run(str(out))  # resuming does not silently accept it either


def test_flipped_bytes(reference, tmp_path):
  out = _copy(reference, tmp_path)
  bad = out / shards.shard_name(1, 4)
  data = bytearray(bad.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0xFF
  bad.write_bytes(bytes(data))
  src = source.PairSource(str(out))  # same size: only reading or a checksum can tell
  with pytest.raises(shards.ShardError, match=f"{bad.name}.*corrupt"):
    [src[i] for i in range(SHARD, 2 * SHARD)]
  with pytest.raises(shards.ShardError, match=f"{bad.name}.*corrupt"):
    src.__getitems__(list(range(NUM)))
  with pytest.raises(shards.ShardError, match=f"{bad.name}.*sha256"):
    source.PairSource(str(out), verify="sha256")
  with pytest.raises(shards.ShardError, match=bad.name):
    source.verify_pairs(str(out))
  assert source.verify_pairs(reference[0])["status"] == "complete"


def test_missing_shard(reference, tmp_path):
  out = _copy(reference, tmp_path)
  os.remove(out / shards.shard_name(3, 4))
  with pytest.raises(shards.ShardError, match=f"{shards.shard_name(3, 4)} is missing"):
    source.PairSource(str(out))


@pytest.mark.parametrize("change, field", [({"guidance": 8.0}, "guidance"),
                                           ({"seed": 8}, "seed"),
                                           ({"num": 48}, "num_examples")])
def test_config_mismatch(reference, tmp_path, change, field):
  out = _copy(reference, tmp_path)
  with pytest.raises(ValueError, match=f"different config(.|\n)*{field}"):
    W.run(str(out), **change)
  # Sidecars remember their run too: with the manifest gone, they still refuse.
  os.remove(out / shards.MANIFEST)
  with pytest.raises(shards.ShardError, match="another (config|run)"):
    W.run(str(out), **change)


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="no prompts"):
    pairs.generate_pairs(str(tmp_path), [], W.fake_generate, latent_shape=W.LATENT, seed=0,
                         batch_size=8, manifest_meta={})
  with pytest.raises(ValueError, match="one per prompt"):
    pairs.generate_pairs(str(tmp_path), ["a"], W.fake_generate, latent_shape=W.LATENT, seed=0,
                         batch_size=8, manifest_meta={}, params=W.fake_params(),
                         encode_fn=lambda p: {"input_ids": np.zeros((1, 6), np.int32)})
