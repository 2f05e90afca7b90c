"""The paper's regression-loss family behind one interface: mse, pseudo_huber, lpips, latent_lpips,
e_latent_lpips.

Legend: B batch, H/W/C latent height/width/channels (NHWC).

Every loss is a pure function `loss_fn(params, a_BxHxWxC, b_BxHxWxC, key) -> scalar batch mean`,
jit-able, chosen by name:

  name             params                                   key
  mse              None                                     unused
  pseudo_huber     None                                     unused
  lpips            {"lpips": pixel LPIPS, "decoder": VAE}   unused
  latent_lpips     LatentLPIPS params                       unused
  e_latent_lpips   LatentLPIPS params                       one augmentation draw per sample

`make_loss(name, **kw)` builds the function from modules you hold; `build_loss(name, **kw)` and
`loss_from_config(config.loss)` also load the weights and return `(loss_fn, params)`; a loss
network without weights (random) is refused unless `allow_random_weights` says it is meant.
Loss-network params are constants of the training step: never differentiate them or update them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from d2g_jax.losses.augment import augment_pair
from d2g_jax.models.latent_vgg import LPIPS

LossFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]
Decode = Callable[[Any, jax.Array], jax.Array]  # (decoder params, latents BxhxwxC) -> BxHxWx3

NAMES = ("mse", "pseudo_huber", "lpips", "latent_lpips", "e_latent_lpips")

# Pseudo-Huber constant of "Improved Techniques for Training Consistency Models" (Song & Dhariwal,
# 2023): c = 0.00054 * sqrt(d), d the number of values per sample (0.03 for 64x64x3 images;
# 0.069 for 64x64x4 SD latents).
HUBER_C_PER_SQRT_DIM = 0.00054


def huber_c(shape: tuple[int, ...]) -> float:
  """The consistency-models Pseudo-Huber c for per-sample shape (H, W, C)."""
  return HUBER_C_PER_SQRT_DIM * math.sqrt(math.prod(shape))


def mse(a_BxHxWxC: jax.Array, b_BxHxWxC: jax.Array) -> jax.Array:
  """Per-sample mean squared error, shape (B,), in fp32."""
  d = a_BxHxWxC.astype(jnp.float32) - b_BxHxWxC.astype(jnp.float32)
  return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def pseudo_huber(a_BxHxWxC: jax.Array, b_BxHxWxC: jax.Array, c: float | None = None) -> jax.Array:
  """Per-sample sqrt(||a - b||^2 + c^2) - c over all H*W*C values, shape (B,), in fp32.

  `c=None` uses the consistency-models value 0.00054 * sqrt(H*W*C).
  """
  c = huber_c(a_BxHxWxC.shape[1:]) if c is None else c
  d = a_BxHxWxC.astype(jnp.float32) - b_BxHxWxC.astype(jnp.float32)
  sq = jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)))
  return jnp.sqrt(sq + c * c) - c


def make_loss(name: str, *, module: LPIPS | None = None, decode: Decode | None = None,
              c: float | None = None, raw_latents: bool = False) -> LossFn:
  """The loss `name` as `loss_fn(params, a, b, key) -> scalar batch mean`.

  module: the LPIPS module (latent for latent_lpips / e_latent_lpips, pixel for lpips).
  decode: lpips only; `decode(params["decoder"], latents)` -> RGB in [-1, 1]. It receives the
    latents exactly as the loss does (undo the VAE scaling factor there if they are scaled).
  c: pseudo_huber constant (None: 0.00054 * sqrt(H*W*C)).
  raw_latents: latent LPIPS inputs are raw encoder outputs (apply the encoder scaling first).
  """
  if name == "mse":
    return lambda params, a, b, key=None: jnp.mean(mse(a, b))
  if name == "pseudo_huber":
    return lambda params, a, b, key=None: jnp.mean(pseudo_huber(a, b, c))
  if name in ("latent_lpips", "e_latent_lpips", "lpips") and module is None:
    raise ValueError(f"loss {name!r} needs an LPIPS module (see d2g_jax.convert.lpips)")
  if name in ("latent_lpips", "e_latent_lpips"):
    if module.config.encoder is None:
      raise ValueError(f"loss {name!r} needs a latent LPIPS module; got the pixel one")
    ensemble = name == "e_latent_lpips"
    if ensemble and module.config.augment is None:
      raise ValueError("e_latent_lpips needs an augmentation policy (config.augment), got None")

    augment = None
    if ensemble:
      augment = functools.partial(augment_pair, policy=module.config.augment,
                                  p=module.config.augment_p)

    def latent_loss(params, a, b, key=None):
      if ensemble and key is None:
        raise ValueError("e_latent_lpips draws augmentations: pass a PRNG key")
      rngs = {"augment": key} if ensemble else {}
      return jnp.mean(module.apply({"params": params}, a, b, augment=augment,
                                   raw_latents=raw_latents, rngs=rngs))
    return latent_loss
  if name == "lpips":
    if decode is None:
      raise ValueError("loss 'lpips' compares decoded pixels: pass decode(decoder_params, latents)")
    if module.config.encoder is not None:
      raise ValueError("loss 'lpips' needs the pixel LPIPS module (load_pixel_lpips)")

    def pixel_loss(params, a, b, key=None):
      # Separate decoder passes: differentiating for `a` alone then skips `b`'s backward.
      xa, xb = decode(params["decoder"], a), decode(params["decoder"], b)
      return jnp.mean(module.apply({"params": params["lpips"]}, xa, xb))
    return pixel_loss
  raise ValueError(f"unknown loss {name!r}; expected one of {NAMES}")


def build_loss(name: str, *, encoder: str = "sd15", weights: str | None = None,
               augment: str = "bg", augment_p: float = 1.0, l1: bool = True,
               c: float | None = None, raw_latents: bool = False, decode: Decode | None = None,
               decoder_params: Any = None, lpips_vgg: str | None = None,
               lpips_heads: str | None = "default", dtype=jnp.float32,
               allow_random_weights: bool = False) -> tuple[LossFn, Any]:
  """(loss_fn, params) for `name`, loading the loss network's weights where it has one.

  weights: E-LatentLPIPS file or folder (`load_latent_lpips`).
  lpips_vgg / lpips_heads: pixel LPIPS trunk and heads (`load_pixel_lpips`).
  Without `weights` (lpips: `lpips_vgg`) the loss network would be randomly initialised,
  which is not the loss of the paper: an error unless `allow_random_weights` (then it warns).
  """
  from d2g_jax.convert import lpips as convert_lpips
  if name in ("mse", "pseudo_huber"):
    return make_loss(name, c=c), None
  if not allow_random_weights and name in ("latent_lpips", "e_latent_lpips") and not weights:
    raise ValueError(f"loss {name!r} has no weights (loss.weights is empty), so its network would "
                     "be randomly initialised: not the paper's loss. Set loss.weights to the "
                     f"{encoder} E-LatentLPIPS weights ({encoder}_latest_vgg16_tuned.pth from "
                     f"{convert_lpips.ELATENTLPIPS_URL}, or the latent_vgg_calibrate stage's "
                     "output folder), or set loss.allow_random_weights=True to train with a "
                     "random one on purpose.")
  if not allow_random_weights and name == "lpips" and not lpips_vgg:
    raise ValueError("loss 'lpips' has no VGG16 weights (loss.lpips_vgg is empty), so its trunk "
                     "would be randomly initialised: not LPIPS. Set loss.lpips_vgg to "
                     f"torchvision's VGG16 state dict ({convert_lpips.TORCHVISION_VGG16_URL}), "
                     "or set loss.allow_random_weights=True to train with a random one on "
                     "purpose.")
  if name in ("latent_lpips", "e_latent_lpips"):
    module, params = convert_lpips.load_latent_lpips(weights, encoder, augment=augment,
                                                     augment_p=augment_p, l1=l1, dtype=dtype)
    return make_loss(name, module=module, raw_latents=raw_latents), params
  if name == "lpips":
    module, params = convert_lpips.load_pixel_lpips(lpips_vgg, lpips_heads, dtype=dtype)
    return make_loss(name, module=module, decode=decode), {"lpips": params,
                                                           "decoder": decoder_params}
  raise ValueError(f"unknown loss {name!r}; expected one of {NAMES}")


def loss_from_config(cfg: ml_collections.ConfigDict, decode: Decode | None = None,
                     decoder_params: Any = None, dtype=jnp.float32) -> tuple[LossFn, Any]:
  """`build_loss` driven by a `config.loss` block (see `config_defaults.base()`)."""
  return build_loss(cfg.name, encoder=cfg.encoder, weights=cfg.weights or None,
                    augment=cfg.augment, augment_p=cfg.augment_p, l1=cfg.l1,
                    c=cfg.huber_c or None, raw_latents=cfg.raw_latents, decode=decode,
                    decoder_params=decoder_params, lpips_vgg=cfg.lpips_vgg or None,
                    lpips_heads=cfg.lpips_heads or None, dtype=dtype,
                    allow_random_weights=cfg.allow_random_weights)
