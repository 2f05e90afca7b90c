"""The programs compiled ahead of time, built from abstract inputs: nothing is allocated.

Legend: B batch (global), H/W/C latent height/width/channels, S text tokens, E text width.

    progs = train_programs(config, "sd15", mesh, per_chip_batch=16)      # train, train_r1
    progs += sampler_programs(config, "sd15", mesh, per_chip_batch=16)   # ddim_step, ddim_scan

A `Program` is a jitted function (traced under its mesh, see `parallel.under_mesh`), its
arguments as `jax.ShapeDtypeStruct`s carrying `NamedSharding`s on the target mesh, and a
reference twin for counting model FLOPs: the same computation without rematerialisation
and with XLA's attention, so that recomputation and kernel choice do not count as work.

Train step: `train.steps.train_step` exactly as the trainer jits it (`build.jit_train_step`:
the state donated and sharded by `config.sharding`, the batch split over every device,
the loss network's params as constants), the conditioning from stored embeddings (the
default `pairs.store_embeddings`, so no text encoder runs). Sampler: the pairs stage's
DDIM + CFG loop (`sampling.sample`) on the teacher UNet in `config.teacher.dtype`, params
replicated and the batch split over every device as `data.pairs.generate_pairs` places
them; `ddim_step` is one step (two UNet rows per pair), `ddim_scan` the whole
`pairs.num_steps` scan. The pairs stage's text encoders (one pass per pair, ~1% of a
step) are not included.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from d2g_jax import dtypes, parallel
from d2g_jax.models.attention import resolve_implementation
from d2g_jax.models.unet import UNet, init_shapes
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.sampling.loop import sample
from d2g_jax.sampling.schedule import ScheduleConfig
from d2g_jax.train import build, steps, streams
from d2g_jax.train.steps import train_step

# SD 1.5 and SDXL base ship the same DDIM-compatible schedule (scheduler_config.json).
SD_SCHEDULE = ScheduleConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             steps_offset=1, clip_sample=False, set_alpha_to_one=False)


@dataclasses.dataclass(frozen=True)
class Model:
  preset: str          # UNetConfig preset
  latent: int          # latent height = width at the default resolution
  sdxl: bool
  text_tokens: int = 77


TRAIN_PROGRAMS = ("train", "train_r1", "d_step", "d_step_r1", "g_step")
MODELS = {"sd15": Model("sd15", 64, False), "sdxl": Model("sdxl_base", 128, True),
          "tiny_sd15": Model("tiny_sd15", 16, False)}


@dataclasses.dataclass
class Program:
  name: str
  fn: Callable            # jitted; fn.trace(*args).lower().compile()
  args: tuple
  rows_per_chip: int      # examples (pairs) one call processes per chip
  reference: Callable     # the same computation for model FLOPs (no remat, XLA attention)
  reference_args: tuple
  note: str = ""


def model_of(config) -> Model:
  """The model a config trains (configs/sd15.py -> sd15, configs/sdxl.py -> sdxl)."""
  return MODELS["sdxl" if config.loss.encoder == "sdxl" else "sd15"]


def _struct(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: _struct(np.shape(a), a.dtype, s), tree, shardings)


def _cond_shapes(model: Model, unet_config: UNetConfig, b: int) -> dict:
  """Shapes and dtypes of the stored conditioning of b pairs (float16 embeddings)."""
  out = {"prompt_embeds": ((b, model.text_tokens, unet_config.cross_dims[0]), jnp.float16)}
  if model.sdxl:
    pooled = unet_config.projection_class_embeddings_input_dim - 6 * \
        unet_config.addition_time_embed_dim
    out["pooled_prompt_embeds"] = ((b, pooled), jnp.float16)
  return out


def time_ids(model: Model) -> np.ndarray | None:
  px = model.latent * 8
  return np.array([px, px, 0, 0, px, px], np.float32) if model.sdxl else None


def _with_train(config, **train) -> Any:
  config = copy.deepcopy(config)
  with config.unlocked():
    for k, v in train.items():
      config.train[k] = v
  return config


def _objective(config, model: Model, unet_config: UNetConfig):
  build.check_recipe(config)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.loss.allow_random_weights = True  # only the shapes of the loss network matter here
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # random loss-network weights: only shapes matter here
    return build.objective_from_parts(config, unet_config, SD_SCHEDULE, sdxl=model.sdxl,
                                      time_ids=time_ids(model))


def train_programs(config, model: Model, mesh: Mesh, per_chip_batch: int, *,
                   platform: str = "tpu", variants=("train", "train_r1"),
                   unet_config: UNetConfig | None = None) -> list[Program]:
  """The train step with R1 off ("train") and on ("train_r1"), or its halves (`half_step`),
  at `per_chip_batch` pairs per chip (global batch = per_chip_batch x mesh devices), as
  `config` trains it."""
  unet_config = unet_config or UNetConfig.preset(model.preset)
  attention = resolve_implementation(config.train.attention, dtypes.get(
      config.train.dtype, "train.dtype"), platform)
  config = _with_train(config, attention=attention)
  b = per_chip_batch * parallel.batch_size_divisor(mesh)
  build.check_batch(b, config.train.microbatches, mesh)
  batch_sh = parallel.batch_sharding(mesh)
  hw = (model.latent, model.latent, unet_config.in_channels)
  batch = {"z": _struct((b,) + hw, jnp.float32, batch_sh),
           "x": _struct((b,) + hw, jnp.float32, batch_sh)}
  batch.update({k: _struct(s, d, batch_sh) for k, (s, d) in
                _cond_shapes(model, unet_config, b).items()})
  teacher = init_shapes(unet_config)

  def build_args(cfg):
    obj, consts = _objective(cfg, model, unet_config)
    state, state_sh = build.state_shardings(obj, teacher, mesh, cfg.sharding)
    consts_sh = build.consts_shardings(consts, mesh, cfg.sharding)
    return obj, (state, abstract_like(consts, consts_sh), batch), (state_sh, consts_sh)

  for name in variants:
    half_step(None, name)  # names checked before any work
  obj, args, (state_sh, consts_sh) = build_args(config)
  ref_obj, ref_args, _ = build_args(_with_train(config, remat=False, attention="xla"))
  batch_shardings = {k: batch_sh for k in batch}
  repl = parallel.replicated(mesh)
  programs = []
  for name in variants:
    if name.startswith("train"):  # exactly as the trainer jits it
      fn = build.jit_train_step(obj, state_sh, consts_sh, batch_shardings,
                                do_r1=name.endswith("_r1"))
    else:
      fn = jax.jit(parallel.under_mesh(half_step(obj, name), mesh),
                   in_shardings=(state_sh, consts_sh, batch_shardings),
                   out_shardings=(state_sh, repl), donate_argnums=0)
    ref = half_step(ref_obj, name)
    programs.append(Program(name, fn, args, per_chip_batch, ref, ref_args,
                            note=f"attention={attention}, remat={config.train.remat}, "
                         f"microbatches={config.train.microbatches}"))
  return programs


def half_step(obj, name: str) -> Callable:
  """`train`, `train_r1` (train_step), or one of its halves with the same randomness:
  `d_step`, `d_step_r1` (discriminator_step), `g_step` (generator_step)."""
  if name not in TRAIN_PROGRAMS:
    raise ValueError(f"unknown train program {name!r}; expected one of {TRAIN_PROGRAMS}")
  r1 = name.endswith("_r1")
  if name.startswith("train"):
    return functools.partial(train_step, obj, do_r1=r1)

  def fn(state, consts, batch):
    key = streams.step_key(state.rng, state.step)
    k_d, k_g = streams.stream(key, "d"), streams.stream(key, "g")
    if name.startswith("d_step"):
      return steps.discriminator_step(obj, state, consts, batch, k_d, r1)
    return steps.generator_step(obj, state, consts, batch, k_g)
  return fn


def sampler_programs(config, model: Model, mesh: Mesh, per_chip_batch: int, *,
                     platform: str = "tpu", unet_config: UNetConfig | None = None
                     ) -> list[Program]:
  """The pairs stage's teacher sampler: one DDIM step with CFG ("ddim_step") and the whole
  `config.pairs.num_steps` scan ("ddim_scan"), `per_chip_batch` pairs per chip."""
  unet_config = unet_config or UNetConfig.preset(model.preset)
  dtype = dtypes.get(config.teacher.dtype, "teacher.dtype")
  attention = resolve_implementation(config.teacher.attention, dtype, platform)
  b = per_chip_batch * len(mesh.devices.flat)
  batch_sh, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  params = jax.tree.map(lambda a: _struct(a.shape, a.dtype, repl), init_shapes(unet_config))
  z = _struct((b, model.latent, model.latent, unet_config.in_channels), jnp.float32, batch_sh)

  def cond_of(n, sharding):
    shapes = _cond_shapes(model, unet_config, n)
    c = {"encoder_hidden_states": _struct(shapes["prompt_embeds"][0], jnp.float32, sharding)}
    if model.sdxl:
      c["added_cond_kwargs"] = {
          "text_embeds": _struct(shapes["pooled_prompt_embeds"][0], jnp.float32, sharding),
          "time_ids": _struct((n, 6), jnp.float32, sharding)}
    return c

  cond, uncond = cond_of(b, batch_sh), cond_of(1, repl)  # one negative prompt, broadcast
  args = (params, z, cond, uncond)
  g = config.pairs.guidance_scale

  def sampler(impl, num_steps):
    unet = UNet(unet_config, dtype=dtype, attention=impl)

    def run(p, z_BxHxWxC, c, u):
      model_fn = lambda x, t, cc: unet.apply({"params": p}, x, t, cc["encoder_hidden_states"],
                                             added_cond_kwargs=cc.get("added_cond_kwargs"))
      return sample(model_fn, SD_SCHEDULE, z_BxHxWxC, c, u, g, num_steps)
    return run

  programs = []
  for name, n in (("ddim_step", 1), ("ddim_scan", config.pairs.num_steps)):
    fn = jax.jit(parallel.under_mesh(sampler(attention, n), mesh),
                 in_shardings=(repl, batch_sh, batch_sh, repl), out_shardings=batch_sh)
    programs.append(Program(name, fn, args, per_chip_batch, sampler("xla", n), args,
                            note=f"{n} DDIM step(s), CFG {g}, attention={attention}"))
  return programs
