"""From a config and a loaded teacher to what a training run needs: the objective (models,
loss, optimisers), its constants, and the train state created directly in its shards.

    obj, consts = build_objective(config, teacher)
    abstract, shardings = state_shardings(obj, teacher_abstract, mesh, config.sharding)
    state = create_state(obj, teacher.unet_params, shardings, key)   # never whole on one device

The state is made by one jitted init whose `out_shardings` are the rules' (big_vision /
nanodo style): `jax.eval_shape` gives the abstract state, the rules give its shardings,
the teacher's host weights are placed straight into the generator's shards, and the
discriminator's new layers are initialised on device.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from d2g_jax import dtypes, parallel
from d2g_jax.infra import optim
from d2g_jax.losses import perceptual
from d2g_jax.models import discriminator as disc
from d2g_jax.models.generator import Generator
from d2g_jax.models.unet import UNet
from d2g_jax.models.vae import decode_latents
from d2g_jax.train import state as state_lib
from d2g_jax.train.steps import Objective, train_step
from d2g_jax.train.streams import stream

RECIPES = ("diffusion2gan", "gdd")


def check_recipe(config) -> None:
  """Raises unless the objective fits `train.recipe`: GDD trains on real latents, which are
  no one's solution from any noise, so everything that needs (z, x) pairs is refused."""
  t, o, d = config.train, config.objective, config.discriminator
  if t.recipe not in RECIPES:
    raise ValueError(f"train.recipe={t.recipe!r}; expected one of {RECIPES}")
  if t.recipe != "gdd":
    return
  bad = []
  if o.regression_weight:
    bad.append(f"objective.regression_weight={o.regression_weight} (real latents are no "
               "target of the generator's noise: set 0)")
  if d.z_cond:
    bad.append("discriminator.z_cond=True (z-conditioning tells D which noise made a latent; "
               "a real latent has none: set False)")
  if o.mix_fraction:
    bad.append(f"objective.mix_fraction={o.mix_fraction} (mix-and-match swaps latents between "
               "(z, c) pairs: set 0)")
  if not o.gan_weight:
    bad.append("objective.gan_weight=0 (the GAN loss is GDD's only loss: set it > 0)")
  if bad:
    raise ValueError("train.recipe='gdd' (GAN on real latents, no pairs) cannot use: "
                     + "; ".join(bad) + ". config_defaults.gdd(config) sets the recipe's "
                     "values (configs/gdd_i.py uses it).")


def _decoder(vae, vae_params):
  """(decode(params, latents) -> RGB, decoder params) for pixel LPIPS through a VAE."""
  if vae is None:
    raise ValueError("loss.name='lpips' decodes latents with the teacher's VAE; load it")
  return functools.partial(decode_latents, vae), vae_params


def build_objective(config, teacher, *, time_ids: np.ndarray | None = None,
                    recompute_text: bool = False) -> tuple[Objective, dict]:
  """(Objective, consts) from `config` (generator, discriminator, loss, objective, train
  blocks) and a loaded teacher (its configs and schedule; its VAE for pixel LPIPS, its
  text encoders when `recompute_text`)."""
  encode_tokens, text_params = (teacher.encode_tokens_fn() if recompute_text else (None, None))
  return objective_from_parts(config, teacher.info.unet, teacher.schedule,
                              sdxl=teacher.family == "sdxl", vae=teacher.vae,
                              vae_params=teacher.vae_params, time_ids=time_ids,
                              encode_tokens=encode_tokens, text_params=text_params)


def objective_from_parts(config, unet_config, schedule, *, sdxl: bool = False, vae=None,
                         vae_params=None, time_ids: np.ndarray | None = None,
                         encode_tokens=None, text_params=None) -> tuple[Objective, dict]:
  """`build_objective` from the pieces (a UNet config and a schedule) instead of a loaded
  teacher folder: benchmarks and ahead-of-time compiles build full-size objectives so.
  The config's recipe is checked by the caller first (`check_recipe`: the train stage does it
  before reading any input)."""
  t, o, d = config.train, config.objective, config.discriminator
  kw = dict(dtype=dtypes.get(t.dtype, "train.dtype"), param_dtype=jnp.float32,
            attention=t.attention, remat=t.remat)
  gen = Generator(UNet(unet_config, **kw), schedule, config.generator.timestep,
                  config.generator.parameterization)
  d_module = disc.Discriminator(unet_config, disc.DiscriminatorOptions(
      z_cond=d.z_cond, multiscale_input=d.multiscale_input,
      multiscale_output=d.multiscale_output), **kw)
  decode = decoder_params = loss_fn = loss_params = None
  if o.regression_weight:  # a zero weight drops the term: no loss network to build
    if config.loss.name == "lpips":
      decode, decoder_params = _decoder(vae, vae_params)
    loss_fn, loss_params = perceptual.loss_from_config(config.loss, decode=decode,
                                                       decoder_params=decoder_params)
  opt = dict(b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, warmup_steps=t.warmup_steps,
             grad_clip=t.grad_clip, weight_decay=t.weight_decay)
  g_tx, g_lr = optim.make_optimizer(t.g_lr, frozen=t.g_frozen, **opt)
  d_tx, d_lr = optim.make_optimizer(t.d_lr, frozen=t.d_frozen, **opt)
  n = schedule.num_train_timesteps
  for name in ("timestep", "diffuse_t_min", "diffuse_t_max"):
    if not 0 <= d[name] < n:
      raise ValueError(f"discriminator.{name}={d[name]} must be in [0, {n - 1}]")
  if d.diffuse_t_min > d.diffuse_t_max:
    raise ValueError(f"discriminator.diffuse_t_min={d.diffuse_t_min} > diffuse_t_max="
                     f"{d.diffuse_t_max}")
  if t.microbatches < 1:
    raise ValueError(f"train.microbatches={t.microbatches} must be >= 1 (1 = no accumulation)")
  if o.r1_interval < 1 or o.r1_samples < 1:
    raise ValueError(f"objective.r1_interval={o.r1_interval} and r1_samples={o.r1_samples} "
                     "must be >= 1 (set r1_gamma=0 to turn R1 off)")
  obj = Objective(
      generator=gen, discriminator=d_module, regression=loss_fn, g_tx=g_tx, d_tx=d_tx,
      g_lr=g_lr, d_lr=d_lr, regression_weight=o.regression_weight, gan_weight=o.gan_weight,
      r1_gamma=o.r1_gamma, r1_interval=o.r1_interval, r1_samples=o.r1_samples,
      mix_fraction=o.mix_fraction, ema_decay=t.ema_decay, d_timestep=d.timestep,
      diffuse=d.diffuse, diffuse_t_min=d.diffuse_t_min, diffuse_t_max=d.diffuse_t_max,
      sdxl=sdxl, time_ids=None if time_ids is None else tuple(float(v) for v in
                                                               np.ravel(time_ids)),
      encode_tokens=encode_tokens, paired=t.recipe != "gdd", microbatches=t.microbatches,
      g_frozen=t.g_frozen, d_frozen=t.d_frozen)
  return obj, {"loss": loss_params, "text": text_params}


def check_batch(batch_size: int, microbatches: int, mesh: Mesh) -> int:
  """This host's rows of a global batch, checked: divisible over the batch devices (and
  hosts), and each device's rows into `microbatches` equal parts."""
  local = parallel.local_batch_size(batch_size, mesh)
  per_device = batch_size // parallel.batch_size_divisor(mesh)
  if per_device % microbatches:
    raise ValueError(f"train.batch_size={batch_size} gives {per_device} rows per device "
                     f"({parallel.batch_size_divisor(mesh)} devices along the batch axes), "
                     f"which do not split into train.microbatches={microbatches}: choose a "
                     "batch size that is a multiple of devices x microbatches")
  return local


def init_fn(obj: Objective):
  """init(key, teacher_unet_params) -> TrainState: G and its EMA from the teacher, D's trunk
  from the teacher and its new layers initialised from `key`'s "init_d" stream; the state's
  rng is its "train" stream (train/streams.py)."""
  def init(key, teacher_params):
    d_params = disc.init_params(obj.discriminator, stream(key, "init_d"), teacher_params)
    return state_lib.create(teacher_params, d_params, obj.g_tx, obj.d_tx, stream(key, "train"))
  return init


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def state_shardings(obj: Objective, teacher_abstract: Any, mesh: Mesh, sharding_cfg
                    ) -> tuple[Any, Any]:
  """(abstract state with shardings, shardings) from the rules: nothing allocated."""
  abstract = jax.eval_shape(init_fn(obj), jax.random.key(0), teacher_abstract)
  shardings = parallel.infer_sharding(abstract, mesh, sharding_cfg.rules,
                                      min_size=sharding_cfg.min_size)
  return with_shardings(abstract, shardings), shardings


def create_state(obj: Objective, teacher_params_host: Any, shardings: Any, key: jax.Array):
  """The initial state, created in its shards by one jit (teacher weights placed per shard)."""
  teacher = parallel.place(teacher_params_host, shardings.g_params)
  repl = parallel.replicated(jax.tree.leaves(shardings)[0].mesh)
  init = jax.jit(init_fn(obj), in_shardings=(repl, shardings.g_params), out_shardings=shardings,
                 donate_argnums=1)
  return init(key, teacher)


def consts_shardings(consts: Any, mesh: Mesh, sharding_cfg) -> Any:
  """The constants (loss network, text encoders) sharded by the same rules."""
  return parallel.infer_sharding(consts, mesh, sharding_cfg.rules, min_size=sharding_cfg.min_size,
                                 prefix="consts/")


def jit_train_step(obj: Objective, state_sh: Any, consts_sh: Any, batch_sh: Any, *,
                   do_r1: bool):
  """`train_step` with R1 on or off, jitted once with explicit shardings and the state
  donated: step(state, consts, batch) -> (state, metrics)."""
  import functools
  mesh = jax.tree.leaves(state_sh)[0].mesh
  repl = parallel.replicated(mesh)
  return jax.jit(parallel.under_mesh(functools.partial(train_step, obj, do_r1=do_r1), mesh),
                 in_shardings=(state_sh, consts_sh, batch_sh), out_shardings=(state_sh, repl),
                 donate_argnums=0)
