"""Pure step functions of Diffusion2GAN: the discriminator update, the generator update,
and the train step that runs one then the other.

Legend: B batch, H/W/C latent height/width/channels.

    objective = Objective(generator, discriminator, regression, g_tx, d_tx, ...)
    step = jax.jit(functools.partial(train_step, objective), static_argnames="do_r1",
                   donate_argnames="state")
    state, metrics = step(state, consts, batch, do_r1=(i % r1_interval == 0))

`consts` = {"loss": the regression loss's params, "text": frozen text-encoder params or
None}: constants of the step, never differentiated or updated, passed separately so that
the donated state holds only what changes. `batch` holds "z", "x" (BxHxWxC) and the
conditioning of the pair records (`models.generator.condition`). Real data (the GDD recipe,
`paired=False`) has no "z": x is a real latent, unrelated to any noise, and z is drawn
fresh in the step from the step's key.

Discriminator update: D sees (x, z, c) as real and (G(z, c), z, c) as fake, with a
`mix_fraction` of the fake rows' latents swapped for other rows' real or generated
latents (z and c kept, still fake); real and fake rows run in one D call of 2B rows,
interleaved per example so that a batch sharded over devices stays in place. With
`do_r1`, the single-sample R1 penalty (weight interval * gamma / 2) is added.
With `microbatches` k > 1 both updates average their gradients over k sequential parts of
the batch (`mean_gradients`); R1 is its own gradient on the batch's first rows either way.
Frozen parameters (`g_frozen` / `d_frozen`, GDD-I's "gdd_i") are constants of the loss:
gradients are taken with respect to the trainable ones only, so the backward pass does no
work for the rest, and `grad_norm` is the trainable gradients' norm.
Generator update: regression_weight * regression(G(z, c), x) + gan_weight * NS-GAN(D(G(z,
c), z, c)) with D's just-updated params, then the EMA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2g_jax.infra.optim import ema_update, split_frozen
from d2g_jax.losses import adversarial as adv
from d2g_jax.models.discriminator import Discriminator
from d2g_jax.models.generator import EncodeTokens, Generator, condition
from d2g_jax.sampling.loop import interleave
from d2g_jax.train.state import TrainState
from d2g_jax.train.streams import microbatch_key, step_key, stream


@dataclasses.dataclass(frozen=True)
class Objective:
  """Everything static about the objective: models, loss, optimisers and weights."""
  generator: Generator
  discriminator: Discriminator
  regression: Callable | None  # losses.perceptual LossFn: (params, a, b, key) -> scalar
  g_tx: optax.GradientTransformation
  d_tx: optax.GradientTransformation
  g_lr: Callable[[Any], Any] = lambda step: 0.0  # schedules, for the metrics
  d_lr: Callable[[Any], Any] = lambda step: 0.0
  regression_weight: float = 1.0
  gan_weight: float = 0.1
  r1_gamma: float = 1.0
  r1_interval: int = 16
  r1_samples: int = 1
  mix_fraction: float = 0.25
  ema_decay: float = 0.999
  d_timestep: int = 0            # D's UNet timestep when inputs are not diffused
  diffuse: bool = False          # noise D's inputs to t ~ U{t_min..t_max}
  diffuse_t_min: int = 0
  diffuse_t_max: int = 999
  sdxl: bool = False
  time_ids: tuple[float, ...] | None = None  # SDXL: the pairs' (6,) micro-conditioning
  encode_tokens: EncodeTokens | None = None  # recompute embeddings from token ids
  paired: bool = True            # x is the teacher's solution from z (False: real data, GDD)
  microbatches: int = 1          # gradient accumulation: each update over k sequential parts
  g_frozen: str = ""             # G's / D's frozen parameters (infra.optim patterns, the same
  d_frozen: str = ""             # as their optimisers'): no gradient computed for them

  def cond(self, consts, batch) -> dict:
    time_ids = None if self.time_ids is None else np.asarray(self.time_ids, np.float32)
    return condition(batch, sdxl=self.sdxl, time_ids_1x6=time_ids,
                     text_params=consts.get("text"), encode_tokens=self.encode_tokens)

  def d_inputs(self, key, *xs_BxHxWxC) -> tuple[list[jax.Array], jax.Array]:
    """What D sees: the latents (noised if `diffuse`) and its timestep per row."""
    if self.diffuse:
      return adv.diffuse(key, self.generator.schedule, self.diffuse_t_min, self.diffuse_t_max,
                         *xs_BxHxWxC)
    b = xs_BxHxWxC[0].shape[0]
    return list(xs_BxHxWxC), jnp.full((b,), self.d_timestep, jnp.int32)

  def apply_d(self, d_params, x, z, cond, t_B) -> list[jax.Array]:
    return self.discriminator.apply({"params": d_params}, x, z, cond, t_B)


def _interleave_tree(a, b):
  return jax.tree.map(interleave, a, b)


def _masked_mean(v_B: jax.Array, mask_B: jax.Array) -> jax.Array:
  m = mask_B.astype(jnp.float32)
  return jnp.sum(v_B * m) / jnp.maximum(jnp.sum(m), 1.0)


def _readout_metrics(prefix: str, names, logits, mask_B) -> dict[str, jax.Array]:
  return {f"{prefix}/{n}": _masked_mean(l.reshape(l.shape[0], -1).mean(axis=1), mask_B)
          for n, l in zip(names, logits)}


def split_microbatches(tree: Any, k: int) -> Any:
  """(B, ...) leaves -> (k, B/k, ...): microbatch j holds rows j, j + k, j + 2k, ... so that
  a batch split over devices along axis 0 gives every device B/(k x devices) rows of each
  microbatch (no data moves)."""
  def split(a):
    if a.shape[0] % k:
      raise ValueError(f"batch of {a.shape[0]} rows does not split into {k} microbatches")
    return jnp.swapaxes(a.reshape((a.shape[0] // k, k) + a.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def mean_gradients(loss_fn: Callable, params: Any, batch: dict, key: jax.Array,
                   microbatches: int = 1) -> tuple[Any, dict]:
  """(gradients, aux) of `loss_fn(params, batch, key_j) -> (loss, aux)`, or with
  `microbatches` k > 1 their means over k sequential microbatches (a `lax.scan`): gradient
  accumulation, the update of the whole batch with 1/k of the activation memory. Metrics in
  `aux` become means over the microbatches. `key` is an update's "microbatches" stream;
  microbatch j draws from `microbatch_key(key, j)` (j = 0 without accumulation)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (_, aux), grads = grad_fn(params, batch, microbatch_key(key, 0))
    return grads, aux
  parts = split_microbatches(batch, microbatches)

  def body(total, part_j):
    part, j = part_j
    (_, aux), grads = grad_fn(params, part, microbatch_key(key, j))
    return jax.tree.map(lambda t, v: t + v.astype(t.dtype), total, (grads, aux)), None

  first = jax.tree.map(lambda a: a[0], parts)
  shapes = jax.eval_shape(lambda: grad_fn(params, first, key))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                       (shapes[1], shapes[0][1]))
  total, _ = jax.lax.scan(body, zeros, (parts, jnp.arange(microbatches)))
  return jax.tree.map(lambda t: t / microbatches, total)


def discriminator_step(obj: Objective, state: TrainState, consts: dict, batch: dict,
                       key: jax.Array, do_r1: bool = False) -> tuple[TrainState, dict]:
  """One D update -> (state with new d_params and d_opt, metrics)."""
  names = obj.discriminator.readout_names()

  def loss_fn(d_params, part, key):
    cond = obj.cond(consts, part)
    z, x = part["z"], part["x"].astype(jnp.float32)
    k_mix, k_diff = stream(key, "mix"), stream(key, "diffuse")
    x_fake = jax.lax.stop_gradient(obj.generator.apply(state.g_params, z, cond))
    x_fake, mm = adv.mix_and_match(k_mix, x, x_fake, obj.mix_fraction)
    (x_real_in, x_fake_in), t_B = obj.d_inputs(k_diff, x, x_fake)
    logits = obj.apply_d(d_params, interleave(x_real_in, x_fake_in), interleave(z, z),
                         _interleave_tree(cond, cond), interleave(t_B, t_B))
    real, fake = [l[0::2] for l in logits], [l[1::2] for l in logits]
    loss_real, loss_fake = adv.d_loss(real, fake)
    loss = loss_real + loss_fake
    score_real, score_fake = adv.per_sample_score(real), adv.per_sample_score(fake)
    ones, genuine = jnp.ones_like(score_real, bool), ~mm["mixed"]
    aux = {"d/loss_real": loss_real, "d/loss_fake": loss_fake, "d/loss": loss,
           "d/logit_real": jnp.mean(score_real),
           "d/logit_fake": _masked_mean(score_fake, genuine),
           **_readout_metrics("d/logit_real", names, real, ones),
           **_readout_metrics("d/logit_fake", names, fake, genuine)}
    if obj.mix_fraction:
      aux["d/logit_mixed"] = _masked_mean(score_fake, mm["mixed"])
    return loss, aux

  def r1_fn(d_params):
    """The R1 penalty on the first r1_samples real rows (their own diffusion noise)."""
    n = obj.r1_samples
    head = jax.tree.map(lambda a: a[:n], batch)
    cond, z = obj.cond(consts, head), head["z"]
    (x_in,), t_B = obj.d_inputs(stream(key, "r1"), head["x"].astype(jnp.float32))
    score = lambda xs: adv.per_sample_score(obj.apply_d(d_params, xs, z, cond, t_B))
    return adv.r1_penalty(score, x_in)

  trainable, join = split_frozen(state.d_params, obj.d_frozen)
  grads, metrics = mean_gradients(lambda p, part, k: loss_fn(join(p), part, k), trainable, batch,
                                  stream(key, "microbatches"), obj.microbatches)
  if do_r1:
    weight = adv.r1_weight(obj.r1_gamma, obj.r1_interval)
    r1, r1_grads = jax.value_and_grad(lambda p: r1_fn(join(p)))(trainable)
    grads = jax.tree.map(lambda g, r: g + weight * r, grads, r1_grads)
    metrics["d/r1"], metrics["d/loss"] = r1, metrics["d/loss"] + weight * r1
  updates, d_opt = obj.d_tx.update(join(grads, frozen_as_zeros=True), state.d_opt,
                                   state.d_params)
  d_params = optax.apply_updates(state.d_params, updates)
  metrics["d/grad_norm"] = optax.tree.norm(grads)
  metrics["d/lr"] = jnp.asarray(obj.d_lr(state.step), jnp.float32)
  return state.replace(d_params=d_params, d_opt=d_opt), metrics


def generator_step(obj: Objective, state: TrainState, consts: dict, batch: dict,
                   key: jax.Array) -> tuple[TrainState, dict]:
  """One G update (and the EMA) against the current D -> (state, metrics)."""

  def loss_fn(g_params, part, key):
    cond = obj.cond(consts, part)
    z, x = part["z"], part["x"].astype(jnp.float32)
    k_reg, k_diff = stream(key, "regression"), stream(key, "diffuse")
    x_hat = obj.generator.apply(g_params, z, cond)
    loss, aux = 0.0, {}
    if obj.regression_weight:
      reg = obj.regression(consts.get("loss"), x_hat, x, k_reg)
      loss, aux["g/regression"] = loss + obj.regression_weight * reg, reg
    if obj.gan_weight:
      (x_in,), t_B = obj.d_inputs(k_diff, x_hat)
      gan = adv.g_loss(obj.apply_d(state.d_params, x_in, z, cond, t_B))
      loss, aux["g/gan"] = loss + obj.gan_weight * gan, gan
    aux["g/loss"] = loss
    if obj.paired:
      aux["g/mse"] = jnp.mean(jnp.square(x_hat - x))
    return loss, aux

  trainable, join = split_frozen(state.g_params, obj.g_frozen)
  grads, metrics = mean_gradients(lambda p, part, k: loss_fn(join(p), part, k), trainable, batch,
                                  stream(key, "microbatches"), obj.microbatches)
  updates, g_opt = obj.g_tx.update(join(grads, frozen_as_zeros=True), state.g_opt,
                                   state.g_params)
  g_params = optax.apply_updates(state.g_params, updates)
  g_ema = ema_update(state.g_ema, g_params, obj.ema_decay)
  metrics["g/grad_norm"] = optax.tree.norm(grads)
  metrics["g/lr"] = jnp.asarray(obj.g_lr(state.step), jnp.float32)
  return state.replace(g_params=g_params, g_ema=g_ema, g_opt=g_opt), metrics


def train_step(obj: Objective, state: TrainState, consts: dict, batch: dict,
               do_r1: bool = False) -> tuple[TrainState, dict]:
  """The discriminator update, then the generator update; step + 1.

  Step i's randomness is `step_key(state.rng, i)`, with a named stream (train/streams.py)
  for each update; a batch without "z" (real data) gets its noise from the step's "noise"
  stream, shared by both. D is skipped when gan_weight is 0 (pure regression).
  """
  key = step_key(state.rng, state.step)
  k_d, k_g = stream(key, "d"), stream(key, "g")
  if "z" not in batch:
    z = jax.random.normal(stream(key, "noise"), batch["x"].shape, jnp.float32)
    batch = {**batch, "z": z}
  metrics = {}
  if obj.gan_weight:
    state, metrics = discriminator_step(obj, state, consts, batch, k_d, do_r1)
  state, g_metrics = generator_step(obj, state, consts, batch, k_g)
  return state.replace(step=state.step + 1), {**metrics, **g_metrics}
