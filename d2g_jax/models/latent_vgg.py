"""VGG16 trunks and the LPIPS distance on top of them: latent (E-)LatentLPIPS and pixel LPIPS.

Legend: B batch, H/W height/width, C channels, K taps (5).
All tensors are NHWC. Feature normalisation, heads and reductions run in fp32.

Two trunks share one module:
  * latent: VGG16 with batch norm (inference statistics) on 4 (SD 1.5 / 2.x / SDXL) or 16
    (SD3 / Flux) latent channels, the first three max-pools removed, as E-LatentLPIPS;
  * pixel: torchvision's plain VGG16 (no batch norm) on RGB in [-1, 1], as the `lpips` package.
Parameter names mirror the PyTorch modules (`net.slice1.0.weight`, `lin0.model.1.weight`) so
conversion is a table (`d2g_jax.convert.lpips`). Batch-norm statistics are frozen and stored in
`params` (`mean`, `var`) so `module.apply({"params": params}, a, b)` needs no other collection;
as a loss this network is fixed. To train the trunk (`d2g_jax.latent_lpips.pretrain`), `VGG16(cfg,
train=True)` uses batch statistics and keeps running ones in the `batch_stats` collection under
the same names (`merge_batch_stats` folds them back into params). `VGGConfig.widths` can narrow
the trunk for small experiments; the official layout is 64/128/256/512/512.

The distance is the LPIPS formula: per tap, unit-normalise features over channels, square the
difference, weight channels with a 1x1 head (no bias), average over space; sum over taps.
E-LatentLPIPS adds, as the official package does, the mean absolute difference of the two
latents (before augmentation) and, given an `augment` function (the loss passes
`d2g_jax.losses.augment.augment_pair`), first applies one random augmentation per sample to both
latents.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

WIDTHS = (64, 128, 256, 512, 512)  # output channels of the five blocks (= the five taps)
CONVS_PER_BLOCK = (2, 2, 3, 3, 3)   # VGG16, configuration "D"

# Per-encoder latent statistics, applied as (z - shift) * scale to a raw VAE-encoder latent
# (`raw_latents=True`); SD 1.5 / 2.x / SDXL shift is 0 and scale is the VAE scaling factor.
ENCODERS: dict[str, tuple[int, float, float]] = {  # name -> (channels, shift, scale)
    "sd15": (4, 0.0, 0.18215),
    "sd21": (4, 0.0, 0.18215),
    "sdxl": (4, 0.0, 0.13025),
    "sd3": (16, 0.0609, 1.5305),
    "flux": (16, 0.1159, 0.3611),
}

# The `lpips` package's ScalingLayer: pixels in [-1, 1] -> ImageNet-normalised input.
PIXEL_SHIFT = (-0.030, -0.088, -0.188)
PIXEL_SCALE = (0.458, 0.448, 0.450)


@dataclasses.dataclass(frozen=True)
class VGGConfig:
  """The VGG16 trunk: input channels, batch norm, where the 2x2 max-pools are and where taps are.

  `pools[k]` puts a max-pool at the end of block k. `tap_after_pool` says whether block k's tap
  is read after that pool (E-LatentLPIPS slices end with the pool) or before it (`lpips` slices
  end with the last ReLU of the block; the pool opens the next slice).
  """
  in_channels: int = 4
  batch_norm: bool = True
  pools: tuple[bool, ...] = (False, False, False, True, True)
  tap_after_pool: bool = True
  bn_eps: float = 1e-5
  widths: tuple[int, ...] = WIDTHS  # channels of the five blocks; WIDTHS is VGG16's

  def __post_init__(self):
    if len(self.widths) != len(WIDTHS) or min(self.widths) < 1:
      raise ValueError(f"VGGConfig.widths={self.widths}: expected {len(WIDTHS)} positive "
                       f"channel counts (VGG16: {WIDTHS})")

  @classmethod
  def latent(cls, in_channels: int = 4, widths: tuple[int, ...] = WIDTHS) -> "VGGConfig":
    return cls(in_channels=in_channels, widths=tuple(widths))

  @classmethod
  def pixel(cls) -> "VGGConfig":
    return cls(in_channels=3, batch_norm=False, pools=(True, True, True, True, False),
               tap_after_pool=False)


class ConvLayer(NamedTuple):
  """One 3x3 convolution of the trunk and its index in torchvision's `features` list."""
  block: int        # 0..4; the PyTorch slice is `slice{block + 1}`
  index: int        # index of the conv in `features`; its batch norm (if any) is index + 1
  in_ch: int
  out_ch: int


def conv_layers(cfg: VGGConfig) -> Iterator[ConvLayer]:
  """The trunk's convolutions in order, with torchvision `vgg16[_bn].features` indices."""
  index, in_ch = 0, cfg.in_channels
  per_conv = 3 if cfg.batch_norm else 2  # conv [bn] relu
  for block, (width, n) in enumerate(zip(cfg.widths, CONVS_PER_BLOCK)):
    for _ in range(n):
      yield ConvLayer(block, index, in_ch, width)
      index += per_conv
      in_ch = width
    index += 1  # the max-pool (torchvision keeps an nn.Identity in its place when removed)


class FrozenBatchNorm(nn.Module):
  """torch BatchNorm2d in eval mode, with its running statistics as (frozen) params."""
  features: int
  eps: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    p = lambda name, init: self.param(name, init, (self.features,), self.param_dtype)
    scale, bias = p("scale", nn.initializers.ones), p("bias", nn.initializers.zeros)
    mean, var = p("mean", nn.initializers.zeros), p("var", nn.initializers.ones)
    mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.eps)
    y = (x_BxHxWxC.astype(jnp.float32) - mean.astype(jnp.float32)) * mul + bias.astype(jnp.float32)
    return y.astype(x_BxHxWxC.dtype)


class VGG16(nn.Module):
  """The trunk; returns the five tap activations (64, 128, 256, 512, 512 channels).

  `train=True`: batch norm from batch statistics (fp32), running averages in `batch_stats`
  (updated with `bn_momentum`: torch's momentum 0.1 is 0.9 here); else the frozen statistics
  in params.
  """
  config: VGGConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  train: bool = False
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x_BxHxWxC) -> list[jax.Array]:
    cfg = self.config
    if x_BxHxWxC.shape[-1] != cfg.in_channels:
      raise ValueError(f"VGG16 expects {cfg.in_channels} input channels, "
                       f"got shape {x_BxHxWxC.shape}")
    # torchvision init: He normal (fan_out, relu), zero bias.
    kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    layers = list(conv_layers(cfg))
    h, taps = x_BxHxWxC.astype(self.dtype), []
    for block in range(len(cfg.widths)):
      for layer in (l for l in layers if l.block == block):
        name = f"slice{block + 1}_{layer.index}"
        h = nn.Conv(layer.out_ch, (3, 3), padding=((1, 1), (1, 1)), kernel_init=kernel_init,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=name)(h)
        if cfg.batch_norm:
          bn_name = f"slice{block + 1}_{layer.index + 1}"
          if self.train:
            h = nn.BatchNorm(use_running_average=False, momentum=self.bn_momentum,
                             epsilon=cfg.bn_eps, dtype=jnp.float32, param_dtype=self.param_dtype,
                             use_fast_variance=False, name=bn_name)(h).astype(self.dtype)
          else:
            h = FrozenBatchNorm(layer.out_ch, cfg.bn_eps, self.param_dtype, name=bn_name)(h)
        h = nn.relu(h)
      pool = lambda t: nn.max_pool(t, (2, 2), strides=(2, 2), padding="VALID")
      if cfg.pools[block] and cfg.tap_after_pool:
        h = pool(h)
      taps.append(h)
      if cfg.pools[block] and not cfg.tap_after_pool and block + 1 < len(cfg.widths):
        h = pool(h)
    return taps


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
  """The whole distance: trunk, input scaling, feature-normalisation epsilon, ensemble, L1 term."""
  vgg: VGGConfig = VGGConfig()
  encoder: str | None = "sd15"     # latent family (ENCODERS); None for pixel LPIPS
  pixel_input: bool = False        # apply the `lpips` ScalingLayer to [-1, 1] pixels
  # Feature normalisation x / sqrt(sum_c x^2 + eps) (E-LatentLPIPS) or x / (sqrt(sum_c x^2) + eps)
  # (`lpips`).
  norm_eps: float = 1e-8
  eps_inside_sqrt: bool = True
  augment: str | None = "bg"       # the ensemble's policy (losses.augment): b, g, c, o, bg, bgc, ...
  augment_p: float = 1.0           # probability multiplier of every augmentation
  l1: bool = True                  # add the mean |a - b| over H, W, C (before augmentation)

  @classmethod
  def latent(cls, encoder: str = "sd15", augment: str | None = "bg", l1: bool = True,
             augment_p: float = 1.0, widths: tuple[int, ...] = WIDTHS) -> "LPIPSConfig":
    """E-LatentLPIPS for an encoder family (call it with `augment=False` for LatentLPIPS).

    `augment`: the ensemble's augmentation policy; `l1`: the official package's L1 term;
    `widths`: the trunk's block widths (VGG16's unless trained narrower).
    """
    if encoder not in ENCODERS:
      raise ValueError(f"unknown encoder {encoder!r}; expected one of {sorted(ENCODERS)}")
    return cls(vgg=VGGConfig.latent(ENCODERS[encoder][0], widths), encoder=encoder,
               augment=augment, augment_p=augment_p, l1=l1)

  @classmethod
  def pixel(cls) -> "LPIPSConfig":
    """The `lpips` package's LPIPS-VGG (v0.1) on RGB pixels in [-1, 1]."""
    return cls(vgg=VGGConfig.pixel(), encoder=None, pixel_input=True, norm_eps=1e-10,
               eps_inside_sqrt=False, augment=None, l1=False)


def normalize_channels(x_BxHxWxC: jax.Array, eps: float, inside_sqrt: bool) -> jax.Array:
  """Unit-normalises features over channels, in fp32, with a finite gradient at zero."""
  x = x_BxHxWxC.astype(jnp.float32)
  ss = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  if inside_sqrt:
    return x * jax.lax.rsqrt(ss + eps)
  positive = ss > 0  # sqrt has an infinite derivative at 0: keep it out of the graph
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, ss, 1.0)), 0.0)
  return x / (norm + eps)


class NetLin(nn.Module):
  """An LPIPS head: a bias-free 1x1 conv to one channel (`lin{k}.model.1` in PyTorch)."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, d_BxHxWxC):
    # Without calibrated weights the heads start at 1: the uncalibrated "baseline" LPIPS, which
    # stays a non-negative distance (the calibrated heads are non-negative too).
    return nn.Conv(1, (1, 1), use_bias=False, kernel_init=nn.initializers.ones,
                   dtype=jnp.float32, param_dtype=self.param_dtype, name="model_1")(d_BxHxWxC)


# augment(key, a_BxHxWxC, b_BxHxWxC) -> (a, b): the same random augmentation of both inputs.
Augment = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class LPIPS(nn.Module):
  """Per-sample perceptual distance between two NHWC batches: (E-)LatentLPIPS or pixel LPIPS."""
  config: LPIPSConfig = LPIPSConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, a_BxHxWxC, b_BxHxWxC, *, augment: Augment | None = None,
               raw_latents: bool = False, add_l1: bool | None = None) -> jax.Array:
    """Distances, shape (B,).

    augment: `augment(key, a, b) -> (a, b)`, one random augmentation per sample applied to
      both inputs (the "E", ensemble, of E-LatentLPIPS: `losses.augment.augment_pair` with
      `config.augment`'s policy); the key is drawn from `rngs={"augment": key}`.
    raw_latents: the inputs are raw VAE-encoder latents; scale them as the encoder's diffusion
      latents first (the official package's `normalize=True`). Latents that a diffusion model
      produces are already scaled: leave this False for them.
    add_l1: add the mean absolute difference (default: `config.l1`).
    """
    cfg = self.config
    if a_BxHxWxC.shape != b_BxHxWxC.shape:
      raise ValueError(f"inputs differ in shape: {a_BxHxWxC.shape} vs {b_BxHxWxC.shape}")
    a, b = a_BxHxWxC.astype(jnp.float32), b_BxHxWxC.astype(jnp.float32)
    if raw_latents:
      if cfg.encoder is None:
        raise ValueError("raw_latents=True needs a latent LPIPS (config.encoder is None)")
      _, shift, scale = ENCODERS[cfg.encoder]
      a, b = (a - shift) * scale, (b - shift) * scale
    add_l1 = cfg.l1 if add_l1 is None else add_l1
    l1_B = jnp.mean(jnp.abs(a - b), axis=(1, 2, 3)) if add_l1 else 0.0
    if augment is not None:
      a, b = augment(self.make_rng("augment"), a, b)
    if cfg.pixel_input:
      shift = jnp.asarray(PIXEL_SHIFT, jnp.float32)
      scale = jnp.asarray(PIXEL_SCALE, jnp.float32)
      a, b = (a - shift) / scale, (b - shift) / scale
    net = VGG16(cfg.vgg, self.dtype, self.param_dtype, name="net")
    # Two passes, not one on the concatenation: a gradient for `a` alone then needs no backward
    # pass through `b`'s features (the usual case: `b` is a fixed target).
    taps_a, taps_b = net(a), net(b)
    dist_B = l1_B
    for k, (feat_a, feat_b) in enumerate(zip(taps_a, taps_b)):
      fa = normalize_channels(feat_a, cfg.norm_eps, cfg.eps_inside_sqrt)
      fb = normalize_channels(feat_b, cfg.norm_eps, cfg.eps_inside_sqrt)
      head = NetLin(self.param_dtype, name=f"lin{k}")(jnp.square(fa - fb))
      dist_B = dist_B + jnp.mean(head, axis=(1, 2, 3))
    return dist_B


def param_shapes(module: LPIPS) -> Any:
  """The param tree of `module` as `jax.ShapeDtypeStruct`s (no compute)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, module.config.vgg.in_channels), jnp.float32)
  return jax.eval_shape(lambda a, b: module.init(jax.random.PRNGKey(0), a, b), x, x)["params"]


def init_params(module: LPIPS, seed: int = 0) -> Any:
  """Random params (numpy) drawn from the module's own initial distributions.

  Drawn with numpy instead of `module.init`, which would compile a whole forward pass for
  ~15M random numbers: trunk kernels He-normal (fan_out, as torchvision), biases 0, batch norm
  the identity (scale 1, bias 0, mean 0, var 1), heads 1.
  """
  rng = np.random.default_rng(seed)
  constants = {"bias": 0.0, "scale": 1.0, "mean": 0.0, "var": 1.0}

  def draw(path, s):
    names = [p.key for p in path]
    if names[-1] == "kernel" and names[0] == "net":
      kh, kw, _, out = s.shape
      return (rng.standard_normal(s.shape) * np.sqrt(2.0 / (kh * kw * out))).astype(s.dtype)
    value = 1.0 if names[-1] == "kernel" else constants[names[-1]]  # heads: 1
    return np.full(s.shape, value, s.dtype)
  return jax.tree_util.tree_map_with_path(draw, param_shapes(module))


def merge_batch_stats(params: Any, batch_stats: Any) -> Any:
  """Trunk params of `VGG16(train=True)` plus its running statistics -> frozen-BN params.

  Every batch-norm layer gets `mean` and `var` beside its `scale` and `bias`: the tree that
  `VGG16(train=False)` (and the `net` of `LPIPS`) takes.
  """
  merged = dict(params)
  for name, stats in batch_stats.items():
    merged[name] = {**merged[name], "mean": stats["mean"], "var": stats["var"]}
  return merged
