"""The train and export stages on a tiny SD 1 teacher: a full run with export loaded by
diffusers, reruns as no-ops, a changed config refused, exact resume after SIGKILL, and
the same steps on 1 device and on 8 fake devices (meshes 2x4 and 8x1)."""

import os
import signal
import subprocess
import sys
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_train_config
import torch
from torch_utils import assert_close_to_scale, nchw, nhwc, randn

from d2g_jax import parallel, run
from d2g_jax.convert import orbax_io
from d2g_jax.data import source
from d2g_jax.infra import metrics as metrics_lib
from d2g_jax.infra import run_config
from d2g_jax.models.generator import Generator
from d2g_jax.models.unet import init_shapes
from d2g_jax.teacher import load_teacher
from d2g_jax.train import build, loop

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["a cat", "the cat", "of the cat", "a photo", "the photo of a cat", "cat cat", "",
           "a photo of the cat"]


def config_for(root, workdir, **overrides):
  config = tiny_train_config.get_config()
  config.workdir = str(workdir)
  config.teacher.path = str(root / "teacher")
  config.train.pairs = str(root / "pairs")
  return tiny_train_config.override(config, **overrides)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A tiny SD 1 teacher and 16 pairs (4-step DDIM, CFG 3), made by the stages themselves."""
  root = tmp_path_factory.mktemp("train")
  (root / "prompts.txt").write_text("\n".join(PROMPTS * 2) + "\n")
  config = config_for(root, root, stages="tiny_teacher,pairs")
  config.pairs.prompts = str(root / "prompts.txt")
  config.pairs.num_steps = 4
  config.pairs.batch_size = 8
  config.pairs.shard_size = 8
  config.pairs.out_dir = str(root / "pairs")
  run.run(config)
  return root


def test_train_export_rerun(root, tmp_path):
  work = tmp_path / "run"
  config = config_for(root, work, stages="train,export", **{"train.sample_every": 8})
  results = run.run(config)
  assert results["train"]["step"] == 8
  assert sorted(int(p) for p in os.listdir(work / "checkpoints") if p.isdigit()) == [4, 6, 8]
  logged = metrics_lib.read_metrics(str(work))
  assert [m["step"] for m in logged] == list(range(1, 9))
  r1_steps = [m["step"] for m in logged if "d/r1" in m]
  assert r1_steps == [1, 5]  # steps 0 and 4 (r1_interval 4), logged as steps done
  for key in ("g/regression", "g/gan", "d/loss_real", "d/loss_fake", "d/grad_norm",
              "g/grad_norm", "g/lr", "d/logit_real/readout_0_pre", "perf/seconds_per_step"):
    assert key in logged[-1], key
  assert any(f.startswith("events") for f in os.listdir(work / "tensorboard"))
  assert (work / "samples" / "step_00000008.png").is_file()

  # The export samples in diffusers in one step, equal to our generator with the EMA weights.
  params, component, _ = orbax_io.load(str(work / "export_orbax"))
  assert component == "unet"
  teacher = load_teacher(config.teacher.path, components=("unet", "text"))
  gen = Generator(teacher.unet, teacher.schedule, 999)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(work / "export"))
  pipe.set_progress_bar_config(disable=True)
  z = randn(0, 2, 16, 16, 4)
  with torch.no_grad():
    ref = pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=1.0, height=128, width=128,
               latents=torch.from_numpy(nchw(z)), output_type="latent").images
  cond, _ = teacher.encode_prompt(PROMPTS[:2])
  ours = jax.jit(gen.apply)(params, jnp.asarray(z), cond)
  assert_close_to_scale(ours, nhwc(ref), 1e-4)
  # The EMA is what was exported, and it moved away from the teacher.
  assert not np.array_equal(params["conv_in"]["kernel"], teacher.unet_params["conv_in"]["kernel"])

  # The eval stage's "checkpoint" source samples the same generator from the checkpoint.
  from d2g_jax import config_defaults
  from d2g_jax.evaluate import samplers
  sampler = samplers.make_sampler(config_defaults.eval_row("checkpoint"), run.resolve(config),
                                  "student")
  assert sampler.meta["step"] == 8
  from_ckpt = jax.jit(sampler.generate_fn)(sampler.params, jnp.asarray(z),
                                           sampler.encode_fn(PROMPTS[:2]))["x"]
  assert_close_to_scale(from_ckpt, ours, 1e-5)
  # ... and so does the sampling API from the workdir (its run_config.json names the rest).
  from d2g_jax.sample import load_student
  sampled = load_student(str(work))(PROMPTS[:2], noise=z)
  assert_close_to_scale(sampled.latents, ours, 1e-5)
  assert sampled.images.shape == (2, 32, 32, 3) and sampled.images.dtype == np.uint8

  # Rerunning finished stages does nothing; a float16 export loads in diffusers.
  again = run.run(config)
  assert again["train"]["step"] == 8 and again["export"] == results["export"]
  half = config_for(root, work, stages="export", **{"export.dtype": "float16",
                                                   "export.out_dir": str(tmp_path / "e16"),
                                                   "export.orbax_dir": str(tmp_path / "o16")})
  run.run(half)
  from safetensors import safe_open
  with safe_open(str(tmp_path / "e16" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
  pipe16 = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "e16"),
                                                             torch_dtype=torch.float16)
  assert pipe16.unet.dtype == torch.float16
  # Another objective into the same workdir is refused before any work, naming the key.
  other = config_for(root, work, stages="train", **{"objective.gan_weight": 0.5})
  with pytest.raises(run_config.ConfigMismatchError, match="objective.gan_weight"):
    run.run(other)


@pytest.mark.slow  # ~70 s; the default suite keeps the CLI-level NaN stop
# (test_cli_errors.py::test_non_finite_loss_stops_with_status_1)
def test_non_finite_loss_stops_before_saving(root, tmp_path, monkeypatch):
  """A NaN in step 5's metrics stops the run naming the step and the term; checkpoints stop
  at 4 (the last good one), and nothing after it is saved."""
  from d2g_jax.infra import metrics as metrics_lib
  real = metrics_lib.to_floats

  def poisoned(step, values):
    values = dict(values)
    if step == 5:
      values["g/regression"] = float("nan")
    return real(step, values)
  monkeypatch.setattr(loop.metrics_lib, "to_floats", poisoned)
  work = tmp_path / "nan"
  with pytest.raises(metrics_lib.NonFiniteError, match=r"step 5: metric 'g/regression' is nan"):
    run.run(config_for(root, work))
  done = sorted(int(p) for p in os.listdir(work / "checkpoints") if p.isdigit())
  assert done == [2, 4]
  assert [m["step"] for m in metrics_lib.read_metrics(str(work))] == [1, 2, 3, 4]


def _train_cmd(root, workdir, steps):
  return [sys.executable, "-m", "d2g_jax.main", f"--config={HERE}/tiny_train_config.py",
          f"--config.workdir={workdir}", f"--config.teacher.path={root / 'teacher'}",
          f"--config.train.pairs={root / 'pairs'}", f"--config.train.num_steps={steps}",
          f"--config.compilation_cache_dir={os.environ['D2G_TEST_XLA_CACHE']}"]


def _env():
  # As the test session runs (8 fake devices, fast compiles, highest precision), so that
  # the train steps compiled by test_train_export_rerun come from the compilation cache.
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
              JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=os.path.dirname(HERE))


def _state(workdir, step):
  with ocp.PyTreeCheckpointer() as reader:
    return reader.restore(str(workdir / "checkpoints" / str(step) / "state"))


@pytest.mark.slow  # ~200 s (three trainer processes); the suite keeps the Checkpointer-level
# SIGKILL test (test_checkpoint.py::test_exact_resume_after_sigkill) within CI's 20 minutes
def test_resume_after_sigkill_is_exact(root, tmp_path):
  """The train stage killed with SIGKILL after its first checkpoint, then run again, ends
  bit-identical to an uninterrupted run: every metric and every leaf of the state."""
  steps = 12
  full, killed = tmp_path / "full", tmp_path / "killed"
  t0 = time.time()
  subprocess.run(_train_cmd(root, full, steps), env=_env(), check=True, capture_output=True)
  print(f"uninterrupted run: {time.time() - t0:.1f} s")
  proc = subprocess.Popen(_train_cmd(root, killed, steps), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = killed / "checkpoints" / "4"
  deadline = time.time() + 600
  while not first.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [int(p) for p in os.listdir(killed / "checkpoints") if p.isdigit()]
  assert max(done) < steps, "the run finished before it could be killed; nothing was resumed"
  subprocess.run(_train_cmd(root, killed, steps), env=_env(), check=True, capture_output=True)
  losses = lambda w: [{k: v for k, v in m.items() if not k.startswith("perf/")}
                      for m in metrics_lib.read_metrics(str(w))]  # all but the wall-clock timings
  assert losses(killed) == losses(full) and len(losses(full)) == steps
  a, b = _state(full, steps), _state(killed, steps)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  as_np = lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(as_np(x), as_np(y))


@pytest.mark.slow  # ~120 s; the default suite keeps the stricter 2x4-mesh check with R1 and
# SGD (test_sharded_step_with_r1_and_sgd_matches_one_device) and the 2-process run
def test_sharded_steps_match_one_device(root):
  config = config_for(root, root / "unused", **{"objective.r1_gamma": 0.0})
  teacher = load_teacher(config.teacher.path, components=("unet",))
  obj, consts = build.build_objective(config, teacher)
  src = source.PairSource(config.train.pairs)
  records = src.__getitems__(range(len(src)))  # 14 pairs: blank prompt lines are skipped
  keys = ["z", "x", "prompt_embeds"]
  batches = [{k: np.stack([r[k] for r in records[i:i + 8]]) for k in keys} for i in (0, 6, 0)]
  results, compiles = {}, []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(kw.get("fun_name", "?"))
      if event == "/jax/core/compile/backend_compile_duration" else None)
  for name, axes, n in [("1", {"data": 1}, 1), ("2x4", {"data": 2, "fsdp": 4}, 8),
                        ("8x1", {"data": 8, "fsdp": 1}, 8)]:
    mesh = parallel.make_mesh(axes, devices=jax.devices()[:n])
    abstract, state_sh = build.state_shardings(obj, init_shapes(teacher.info.unet), mesh,
                                               config.sharding)
    state = build.create_state(obj, teacher.unet_params, state_sh, jax.random.key(0))
    batch_sh = {k: parallel.batch_sharding(mesh) for k in keys}
    step = build.jit_train_step(obj, state_sh, build.consts_shardings(consts, mesh,
                                                                       config.sharding),
                                batch_sh, do_r1=False)
    history = []
    for i, b in enumerate(batches):
      compiles.clear()
      state, m = step(state, consts, parallel.host_to_global(b, mesh))
      history.append(jax.device_get(m))
      if i:  # compiled once, at the first step
        assert not [c for c in compiles if "train_step" in c], (name, i, compiles)
    if name == "2x4":  # parameters and optimiser states really are split over fsdp
      kernel = state.g_params["down_blocks_1"]["resnets_0"]["conv2"]["kernel"]
      assert "fsdp" in str(kernel.sharding.spec)
      assert kernel.addressable_shards[0].data.size == kernel.size // 4  # a quarter per device
      mu = state.g_opt[1][0].mu["down_blocks_1"]["resnets_0"]["conv2"]["kernel"]
      assert mu.sharding.spec == kernel.sharding.spec
      assert "fsdp" in str(state.d_params["unet"]["mid_block"]["resnets_0"]["conv1"]["kernel"]
                           .sharding.spec)
    results[name] = (history, jax.device_get(state.g_params), jax.device_get(state.d_params))
  ref_hist, ref_g, ref_d = results["1"]
  for name in ("2x4", "8x1"):
    hist, g, d = results[name]
    for h, r in zip(hist, ref_hist):
      for k in r:
        np.testing.assert_allclose(h[k], r[k], rtol=2e-4, atol=1e-5, err_msg=f"{name} {k}")
    for tree, ref in ((g, ref_g), (d, ref_d)):
      for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=name)


def test_sharded_step_with_r1_and_sgd_matches_one_device(root):
  """The R1 step on 8 devices (mesh 2x4: data and FSDP) against 1 device, with SGD at lr 1
  and no clipping: each update is minus the gradient, so a gradient off by a factor on
  either (which Adam's normalised step would hide) shows. R1 weighted to matter (gamma 100),
  diffused D inputs and mix-and-match on."""
  import dataclasses

  import optax
  config = config_for(root, root / "unused", **{"objective.r1_gamma": 100.0,
                                                "discriminator.diffuse": True})
  teacher = load_teacher(config.teacher.path, components=("unet",))
  obj, consts = build.build_objective(config, teacher)
  obj = dataclasses.replace(obj, g_tx=optax.sgd(1.0), d_tx=optax.sgd(1.0))
  records = source.PairSource(config.train.pairs).__getitems__(range(8))
  keys = ["z", "x", "prompt_embeds"]
  batch = {k: np.stack([r[k] for r in records]) for k in keys}
  results = {}
  for name, axes, n in [("1", {"data": 1}, 1), ("2x4", {"data": 2, "fsdp": 4}, 8)]:
    mesh = parallel.make_mesh(axes, devices=jax.devices()[:n])
    _, state_sh = build.state_shardings(obj, init_shapes(teacher.info.unet), mesh,
                                        config.sharding)
    state = build.create_state(obj, teacher.unet_params, state_sh, jax.random.key(0))
    old = jax.device_get((state.g_params, state.d_params))
    step = build.jit_train_step(obj, state_sh, build.consts_shardings(consts, mesh,
                                                                       config.sharding),
                                {k: parallel.batch_sharding(mesh) for k in keys}, do_r1=True)
    state, m = step(state, consts, parallel.host_to_global(batch, mesh))
    new = jax.device_get((state.g_params, state.d_params))
    results[name] = (jax.tree.map(np.subtract, new, old), jax.device_get(m))
  (ref, ref_m), (got, m) = results["1"], results["2x4"]
  assert ref_m["d/r1"] > 0
  for part, want, have in zip(("g_params", "d_params"), ref, got):
    want, have = jax.tree.leaves(want), jax.tree.leaves(have)
    scale = max(np.abs(w).max() for w in want)
    err = max(np.abs(h - w).max() for h, w in zip(have, want))
    assert scale > 0 and err <= 1e-4 * scale, (part, err, scale)
  for k in ref_m:
    np.testing.assert_allclose(m[k], ref_m[k], rtol=2e-4, atol=1e-5, err_msg=k)
