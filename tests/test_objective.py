"""The generator against diffusers' one-step pipeline, conditioning from pair records, and
the Diffusion2GAN step functions training on tiny pairs from a tiny teacher."""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_trajectory
import torch
from flax import traverse_util
from torch_utils import assert_close_to_scale, nchw, nhwc, randn

from d2g_jax.convert.pipeline import export_pipeline
from d2g_jax.data.teacher_pairs import teacher_fns
from d2g_jax.infra import optim
from d2g_jax.losses import perceptual
from d2g_jax.models import discriminator as disc
from d2g_jax.models.generator import Generator, condition
from d2g_jax.teacher import load_teacher
from d2g_jax.tiny import build
from d2g_jax.train import state as state_lib
from d2g_jax.train import steps

PROMPTS = ["a photo of the cat", "the cat", "of the cat", ""]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("objective")
  cache = {}

  def get(family):
    if family not in cache:
      cache[family] = str(root / family)
      build(family, cache[family])
      if family == "sd2":  # SD 2.x (768) is a v-prediction model
        test_trajectory.patch_scheduler(cache[family], prediction_type="v_prediction")
    return cache[family]
  return get


@pytest.mark.parametrize("family,parameterization", [("sd1", "auto"), ("sd2", "auto"),
                                                     ("sdxl", "sample")])
def test_generator_is_the_one_step_pipeline(folders, tmp_path, family, parameterization):
  """At init, G(z, c) is what diffusers computes with the exported one-step pipeline."""
  folder = folders(family)
  teacher = load_teacher(folder, components=("unet", "text"))
  gen = Generator(teacher.unet, teacher.schedule, timestep=999, parameterization=parameterization)
  want_type = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "sample"}[family]
  assert gen.prediction_type == want_type
  out = str(tmp_path / "student")
  export_pipeline(folder, teacher.unet, teacher.unet_params, out, timestep=gen.timestep,
                  prediction_type=gen.prediction_type)
  cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else \
      diffusers.StableDiffusionPipeline
  pipe = cls.from_pretrained(out)
  pipe.set_progress_bar_config(disable=True)
  z = randn(0, 2, 16, 16, 4)
  with torch.no_grad():
    ref = pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
               latents=torch.from_numpy(nchw(z)), output_type="latent").images
  cond, _ = teacher.encode_prompt(PROMPTS[:2], height=32, width=32)
  ours = jax.jit(gen.apply)(teacher.unet_params, jnp.asarray(z), cond)
  assert_close_to_scale(ours, nhwc(ref), 1e-4)
  with pytest.raises(ValueError, match="timestep=1000 must be in"):
    Generator(teacher.unet, teacher.schedule, timestep=1000)


@pytest.fixture(scope="module")
def pairs(folders):
  """8 tiny SD 1 pairs (4-step DDIM, CFG 3) with stored embeddings and token ids."""
  teacher = load_teacher(folders("sd1"), components=("unet", "text"))
  encode_fn, generate_fn, params = teacher_fns(teacher, guidance_scale=3.0, num_steps=4,
                                               height=64, width=64)
  prompts = PROMPTS * 2
  z = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
  ids = encode_fn(prompts)
  out = jax.jit(generate_fn)(params, z, ids)
  batch = {"z": z, "x": out["x"], "prompt_embeds": out["prompt_embeds"], **ids}
  return teacher, batch


def test_condition_from_token_ids(pairs):
  teacher, batch = pairs
  stored = condition(batch, sdxl=False)
  assert stored["encoder_hidden_states"].dtype == jnp.float32
  encode, text_params = teacher.encode_tokens_fn()
  no_embeds = {k: v for k, v in batch.items() if k != "prompt_embeds"}
  recomputed = condition(no_embeds, sdxl=False, text_params=text_params, encode_tokens=encode)
  # float16 storage: agreement to float16's resolution.
  np.testing.assert_allclose(recomputed["encoder_hidden_states"], stored["encoder_hidden_states"],
                             rtol=2e-3, atol=2e-3)
  with pytest.raises(ValueError, match="store_embeddings"):
    condition(no_embeds, sdxl=False)


def make_objective(teacher, regression="mse", **kw):
  gen = Generator(teacher.unet, teacher.schedule, timestep=999)
  d_module = disc.Discriminator(teacher.unet.config)
  g_tx, g_lr = optim.make_optimizer(3e-4, b1=0.0, b2=0.99, warmup_steps=5, grad_clip=10.0)
  d_tx, d_lr = optim.make_optimizer(3e-4, b1=0.0, b2=0.99, warmup_steps=5, grad_clip=10.0)
  loss_fn, loss_params = perceptual.build_loss(regression) if regression != "e_latent_lpips" \
      else (None, None)
  args = dict(regression=loss_fn, g_tx=g_tx, d_tx=d_tx, g_lr=g_lr, d_lr=d_lr, gan_weight=0.1,
              r1_gamma=1.0, r1_interval=4, mix_fraction=0.25, ema_decay=0.9)
  args.update(kw)
  obj = steps.Objective(gen, d_module, **args)
  d_params = disc.init_discriminator(d_module, teacher.unet_params, jax.random.key(1))
  state = jax.jit(lambda g, d: state_lib.create(g, d, obj.g_tx, obj.d_tx, jax.random.key(2)))(
      teacher.unet_params, d_params)
  return obj, state, {"loss": loss_params}


@pytest.mark.slow  # ~135 s; the default suite's demo test shows distillation learning end to end
def test_training_fits_pairs_and_separates_logits(pairs):
  """A few hundred steps: the regression loss falls far below its value at init, and D
  tells the real latents from the generated ones."""
  teacher, batch = pairs
  obj, state, consts = make_objective(teacher)
  step = jax.jit(functools.partial(steps.train_step, obj), static_argnames="do_r1",
                 donate_argnames="state")
  history = []
  for i in range(100):
    state, m = step(state, consts, batch, do_r1=(i % obj.r1_interval == 0))
    history.append(jax.device_get(m))
  first = history[0]
  last = {k: np.mean([h[k] for h in history[-20:]]) for k in history[-1]}  # GANs oscillate
  assert int(state.step) == 100
  assert np.isfinite([h["g/loss"] for h in history]).all()
  assert "d/r1" in history[0] and "d/r1" not in history[1]
  assert last["g/regression"] < 0.1 * first["g/regression"], (first["g/regression"],
                                                              last["g/regression"])
  assert last["d/logit_real"] > last["d/logit_fake"] + 0.5, (last["d/logit_real"],
                                                               last["d/logit_fake"])
  for name in obj.discriminator.readout_names():
    assert f"d/logit_real/{name}" in last and f"d/logit_fake/{name}" in last
  # The EMA moved towards the trained generator, and is not it.
  g, e = (jax.tree.leaves(t)[0] for t in (state.g_params, state.g_ema))
  assert not np.array_equal(g, e)


def test_step_metrics_and_weights(pairs):
  """Each term enters with its weight: with gan_weight 0, no D update and no GAN term;
  with regression_weight 0, no regression term (GDD)."""
  teacher, batch = pairs
  obj, state, consts = make_objective(teacher, gan_weight=0.0)
  new, m = jax.jit(functools.partial(steps.train_step, obj))(state, consts, batch)
  assert "g/gan" not in m and "d/loss" not in m
  np.testing.assert_allclose(m["g/loss"], m["g/regression"], rtol=1e-6)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.d_params),
                                                  jax.tree.leaves(state.d_params)))
  obj, state, consts = make_objective(teacher, regression_weight=0.0)
  shapes = jax.eval_shape(functools.partial(steps.train_step, obj, do_r1=True), state, consts,
                          batch)[1]  # traced, not compiled
  assert "g/regression" not in shapes and {"g/gan", "d/r1", "d/loss"} <= set(shapes)


def test_split_microbatches_keeps_each_devices_rows():
  a = jnp.arange(12).reshape(12, 1)
  parts = steps.split_microbatches({"x": a}, 3)["x"]
  assert parts.shape == (3, 4, 1)
  np.testing.assert_array_equal(parts[1, :, 0], [1, 4, 7, 10])  # rows j, j + k, ...
  with pytest.raises(ValueError, match="does not split into 5 microbatches"):
    steps.split_microbatches({"x": a}, 5)


@pytest.mark.slow  # ~105 s
def test_microbatches_accumulate_the_whole_batch_update_with_r1(pairs):
  """Gradient accumulation: with SGD at lr 1 the update is minus the gradient, and 4
  microbatches give the whole batch's D and G updates and its metrics, with R1 on: R1 runs
  once, on the batch's first rows, and is added once to the accumulated mean. No
  mix-and-match: it pairs rows inside a microbatch, so it differs by design."""
  import optax
  teacher, batch = pairs
  sgd = optax.sgd(1.0)
  runs = {}
  for k in (1, 4):
    obj, state, consts = make_objective(teacher, mix_fraction=0.0, microbatches=k,
                                        g_tx=sgd, d_tx=sgd, r1_gamma=100.0)  # R1 ~ the GAN term
    new, m = jax.jit(functools.partial(steps.train_step, obj, do_r1=True))(state, consts, batch)
    runs[k] = (jax.device_get(new), jax.device_get(m))
  (ref, ref_m), old = runs[1], jax.device_get(state)
  assert ref_m["d/r1"] > 0
  new, m = runs[4]
  for part in ("d_params", "g_params"):
    want = jax.tree.leaves(jax.tree.map(np.subtract, getattr(ref, part), getattr(old, part)))
    got = jax.tree.leaves(jax.tree.map(np.subtract, getattr(new, part), getattr(old, part)))
    scale = max(np.abs(w).max() for w in want)
    assert scale > 0
    err = max(np.abs(g - w).max() for g, w in zip(got, want))
    assert err <= 1e-4 * scale, (part, err, scale)
  assert set(m) == set(ref_m)
  for name in ("d/loss", "d/r1", "d/logit_real", "d/logit_fake", "d/grad_norm", "g/regression",
               "g/gan"):
    np.testing.assert_allclose(m[name], ref_m[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_ema_is_exact_over_three_steps(pairs):
  """g_ema after three steps is d^3 g_0 + (1 - d)(d^2 g_1 + d g_2 + g_3), g_i the generator
  after step i (d = 0.9, computed here in float64), and far from both g_0 and g_3."""
  import optax
  teacher, batch = pairs
  d = 0.9
  obj, state, consts = make_objective(teacher, gan_weight=0.0, g_tx=optax.sgd(1e-3),
                                      ema_decay=d)
  step = jax.jit(functools.partial(steps.train_step, obj))
  f64 = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  g = [f64(state.g_params)]
  for _ in range(3):
    state, _ = step(state, consts, batch)
    g.append(f64(state.g_params))
  want = [d**3 * a + (1 - d) * (d**2 * b + d * c + e) for a, b, c, e in zip(*g)]
  got = f64(state.g_ema)
  scale = max(np.abs(w).max() for w in want)
  err = max(np.abs(x - w).max() for x, w in zip(got, want))
  moved = max(np.abs(w - a).max() for w, a in zip(want, g[0]))
  behind = max(np.abs(w - e).max() for w, e in zip(want, g[3]))
  assert err <= 1e-6 * scale, (err, scale)
  assert min(moved, behind) > 1e3 * err and min(moved, behind) > 1e-4 * scale, (moved, behind)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_generator_head_and_x0_in_float32(prediction_type):
  """With the UNet's body in bf16, its output head still computes in fp32: the prediction is
  not on bf16's lattice, and x0 is the fp32 formula applied to that fp32 prediction (a bf16
  prediction times sqrt((1 - a) / a) ~ 14.6 at t = 999 would put x0 on a coarse lattice)."""
  from d2g_jax.models.unet import UNet
  from d2g_jax.models.unet_config import UNetConfig
  from d2g_jax.sampling.schedule import ScheduleConfig
  cfg = UNetConfig.preset("tiny_sd15")
  schedule = ScheduleConfig.stable_diffusion(prediction_type)
  z = jnp.asarray(randn(0, 2, 16, 16, 4))
  cond = {"encoder_hidden_states": jnp.asarray(randn(1, 2, 3, cfg.cross_dims[0]))}
  params = UNet(cfg).init(jax.random.key(0), z, jnp.zeros((2,)), cond["encoder_hidden_states"])
  gen = Generator(UNet(cfg, dtype=jnp.bfloat16), schedule, timestep=999)
  pred = jax.jit(gen.unet_output)(params["params"], z, cond)
  assert pred.dtype == jnp.float32
  on_bf16_lattice = np.asarray(pred == pred.astype(jnp.bfloat16).astype(jnp.float32))
  assert on_bf16_lattice.mean() < 0.05, on_bf16_lattice.mean()
  x0 = np.asarray(jax.jit(gen.apply)(params["params"], z, cond), np.float64)
  a = float(schedule.alphas_cumprod[999])
  p, zz = np.asarray(pred, np.float64), np.asarray(z, np.float64)
  want = ((zz - np.sqrt(1 - a) * p) / np.sqrt(a) if prediction_type == "epsilon"
          else np.sqrt(a) * zz - np.sqrt(1 - a) * p)
  np.testing.assert_allclose(x0, want, rtol=0, atol=1e-5 * np.abs(want).max())
  # The body really is bf16: the same params in fp32 give another prediction.
  fp32 = Generator(UNet(cfg), schedule, timestep=999)
  assert not np.allclose(jax.jit(fp32.unet_output)(params["params"], z, cond), pred, atol=1e-4)


@pytest.mark.slow  # ~65 s
def test_every_random_key_of_a_train_step_is_distinct(pairs, monkeypatch):
  """Named streams never collide: every key one train step derives (fold_in or split, run
  inside the jitted step, recorded by a callback) is different from every other, with 4
  microbatches, R1, mix-and-match, diffused D inputs and z drawn in the step (real data)."""
  teacher, batch = pairs
  obj, state, consts = make_objective(teacher, microbatches=4, diffuse=True, paired=False,
                                      mix_fraction=0.5)
  keys = []
  record = lambda data: keys.append(tuple(np.asarray(data).ravel().tolist()))

  def recorded(fn):
    def wrapper(*args, **kw):
      out = fn(*args, **kw)
      for k in (out if out.ndim else out[None]):
        jax.debug.callback(record, jax.random.key_data(k))
      return out
    return wrapper
  monkeypatch.setattr(jax.random, "fold_in", recorded(jax.random.fold_in))
  monkeypatch.setattr(jax.random, "split", recorded(jax.random.split))
  unpaired = {k: v for k, v in batch.items() if k != "z"}
  step = jax.jit(functools.partial(steps.train_step, obj, do_r1=True))
  _, m = step(state, consts, unpaired)
  jax.block_until_ready(m)
  jax.effects_barrier()
  # step, noise, d, g, r1 (+2 in diffuse), 2 x microbatches, 4 x (microbatch, diffuse (+2))
  # per update, + mix (+2) per D microbatch
  assert len(keys) >= 5 + 2 + 2 + 2 * 4 * 4 + 4 * 3, len(keys)
  duplicates = {k for k in keys if keys.count(k) > 1}
  assert not duplicates, f"{len(duplicates)} keys drawn for more than one purpose"


def test_sdxl_auto_generator_is_diffusers_ddim_x0(tmp_path):
  """SDXL with the default parameterization "auto" (the teacher predicts epsilon): G(z, c) is
  the x0 diffusers' DDIMScheduler computes (`pred_original_sample`) from its UNet's
  prediction at t = 999 from the same noise, with SDXL's scheduler settings."""
  from test_unet import inputs as unet_inputs
  from test_unet import make_diffusers_unet

  from d2g_jax.convert.unet import load_unet
  from d2g_jax.sampling.schedule import ScheduleConfig
  model = make_diffusers_unet("tiny_sdxl", str(tmp_path))
  unet, params = load_unet(str(tmp_path))
  scheduler = diffusers.DDIMScheduler(  # SDXL base's scheduler_config.json values
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
      set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
      prediction_type="epsilon")
  gen = Generator(unet, ScheduleConfig.from_diffusers(dict(scheduler.config)))
  assert gen.parameterization == "auto" and gen.prediction_type == "epsilon"
  z, _, ctx, added = unet_inputs(unet.config)
  cond = {"encoder_hidden_states": jnp.asarray(ctx),
          "added_cond_kwargs": {k: jnp.asarray(v) for k, v in added.items()}}
  ours = jax.jit(gen.apply)(params, jnp.asarray(z), cond)
  scheduler.set_timesteps(1)
  sample = torch.from_numpy(nchw(z))
  with torch.no_grad():
    eps = model(sample, 999, torch.from_numpy(ctx), added_cond_kwargs={
        k: torch.from_numpy(v) for k, v in added.items()}).sample
    ref = scheduler.step(eps, 999, sample).pred_original_sample
  assert_close_to_scale(ours, nhwc(ref), 1e-4)


def test_frozen_parameters_get_no_gradient(pairs):
  """GDD-I (g_frozen="gdd_i"): G's gradient is taken for the trainable parameters only. The
  update equals the one made from the whole gradient by the optimiser's mask (before the
  split) on the trainable parameters, the frozen ones stay bit-identical, g/grad_norm is the
  trainable gradient's norm (SGD at lr 1: the update's), and the traced step has fewer
  convolutions (no weight gradients for the frozen ones)."""
  import optax
  teacher, batch = pairs
  labels = lambda p: optim.path_labels(p, "gdd_i")
  tx = optax.multi_transform({optim.TRAIN: optax.sgd(1e-3), optim.FROZEN: optax.set_to_zero()},
                             labels)
  runs = {}
  for frozen in ("", "gdd_i"):
    obj, state, consts = make_objective(teacher, gan_weight=0.0, g_tx=tx, g_frozen=frozen)
    fn = functools.partial(steps.train_step, obj)
    convs = str(jax.make_jaxpr(fn)(state, consts, batch)).count("conv_general_dilated")
    new, m = jax.jit(fn)(state, consts, batch)
    runs[frozen] = (jax.device_get(new.g_params), jax.device_get(m), convs)
  old = traverse_util.flatten_dict(jax.device_get(state.g_params), sep="/")
  (before, m_before, convs_before), (after, m_after, convs_after) = runs[""], runs["gdd_i"]
  before = traverse_util.flatten_dict(before, sep="/")
  after = traverse_util.flatten_dict(after, sep="/")
  is_frozen = traverse_util.flatten_dict(labels(state.g_params), sep="/")
  scale = max(np.abs(before[k] - old[k]).max() for k in old)
  assert scale > 0
  sq = 0.0
  for k in old:
    if is_frozen[k] == optim.FROZEN:
      np.testing.assert_array_equal(after[k], old[k], err_msg=k)
    else:
      np.testing.assert_allclose(after[k] - old[k], before[k] - old[k], rtol=0,
                                 atol=1e-5 * scale, err_msg=k)
      sq += np.sum(np.square((after[k] - old[k]) / 1e-3, dtype=np.float64))
  np.testing.assert_allclose(m_after["g/grad_norm"], np.sqrt(sq), rtol=1e-4)
  assert m_before["g/grad_norm"] > 1.01 * m_after["g/grad_norm"]  # it counted frozen leaves
  np.testing.assert_allclose(m_after["g/loss"], m_before["g/loss"], rtol=1e-6)
  assert convs_after < convs_before, (convs_after, convs_before)
