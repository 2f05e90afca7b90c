"""Differentiable paired augmentations on NHWC latents, for E-LatentLPIPS.

Legend: B batch, H/W height/width, C channels (4 or 16 latent channels, not RGB).

E-LatentLPIPS (Kang et al. 2024, arXiv 2405.05967) compares two latents after
one random augmentation that is drawn per sample and applied identically to
both, in the spirit of StyleGAN2-ADA (Karras et al. 2020, arXiv 2006.06676).
Written from the papers; strengths and defaults follow the official
`elatentlpips` package. Groups (policy letters), in the order they run:

  b  blit: x-flip, rotation by a multiple of 90 degrees, integer translation
     (uniform, up to 1/8 of the size, rounded).
  g  geometric: isotropic scale (log2-normal, std 0.2), rotation (uniform over
     the full circle, before and after the anisotropic scale), anisotropic scale
     (log2-normal, std 0.2), fractional translation (normal, std 1/8 of the
     size).
     Groups b and g compose into one affine map per sample (b first), applied by
     ADA's anti-aliased resample (`d2g_jax.losses.resample`: reflect padding,
     2x sym6 upsampling, bilinear, sym6 low-pass and 2x downsampling), as the
     official package does: so even flips and quarter turns are filtered.
  c  colour: brightness (add U[-0.5, 0.5)), contrast (scale the deviation from
     the sample's mean over H, W, C by U[0.5, 1.5)), saturation (scale each
     pixel's deviation from its mean over channels by U[0, 2)).
  o  cutout: zero a rectangle of half the height and half the width at a
     uniformly random centre.

Each transform is applied to a sample with probability `p` (the rotation twice,
each with 1 - sqrt(1 - p), so that some rotation happens with probability `p`).
A transform's "not applied" value is its identity (flip 0, scale 0 in log2,
contrast 1, cutout size 0); a sample on which no transform of a group fires
keeps its input bit for bit through that group (b and g count as one), so
p = 0 is the exact identity.

Equal in distribution to the official package's augmentation (measured as a
black box: `tests/test_augment.py`, `tests/test_augment_official.py`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from d2g_jax.losses.resample import affine_resample

POLICIES = frozenset("bgco")
GROUPS = {
    "b": ("xflip", "rotate90", "xint"),
    "g": ("scale", "rotate", "aniso", "xfrac"),
    "c": ("brightness", "contrast", "saturation"),
    "o": ("cutout",),
}

# Defaults of the official package (ELatentLPIPS sets the overall p to 1).
DEFAULT_P = 1.0
XINT_MAX = 0.125      # integer translation range, fraction of the size
SCALE_STD = 0.2       # log2 std of isotropic scaling
ROTATE_MAX = 1.0      # rotation range, 1 = full circle
ANISO_STD = 0.2       # log2 std of anisotropic scaling
XFRAC_STD = 0.125     # std of fractional translation, fraction of the size
BRIGHTNESS_MAX = 0.5  # additive offset ~ U[-0.5, 0.5)
CONTRAST_MAX = 0.5    # factor ~ U[1 - 0.5, 1 + 0.5)
SATURATION_MAX = 2.0  # factor ~ U[0, 2)
CUTOUT_SIZE = 0.5     # cutout side, fraction of the size

_HI = jax.lax.Precision.HIGHEST


class AugParams(NamedTuple):
  """Per-sample parameters; a field is None when its group is not in the policy.

  Pixel pairs are (dy, dx), i.e. (row, column), positive = content moves down/right.
  """
  xflip_B: jax.Array | None = None          # int32, 1 = mirror along W
  rot90_B: jax.Array | None = None          # int32 in 0..3, quarter turns as np.rot90
  shift_Bx2: jax.Array | None = None        # int32 pixels
  log2_scale_B: jax.Array | None = None     # isotropic zoom 2**s
  theta_pre_B: jax.Array | None = None      # radians, before the anisotropic scale
  log2_aniso_B: jax.Array | None = None     # W stretched by 2**a, H by 2**-a
  theta_post_B: jax.Array | None = None     # radians, after the anisotropic scale
  frac_shift_Bx2: jax.Array | None = None   # float pixels
  brightness_B: jax.Array | None = None     # additive offset
  contrast_B: jax.Array | None = None       # factor around the sample mean
  saturation_B: jax.Array | None = None     # factor around the per-pixel channel mean
  cutout_size_B: jax.Array | None = None    # fraction of the size, 0 = none
  cutout_center_Bx2: jax.Array | None = None  # (row, column) as fractions of (H, W)


def check_policy(policy: str) -> str:
  """Returns `policy` if every letter is a known group, else raises ValueError."""
  if not isinstance(policy, str):
    raise TypeError(f"augmentation policy must be a string such as 'bgco', got {policy!r}")
  bad = sorted(set(policy) - POLICIES)
  if bad:
    raise ValueError(
        f"augmentation policy {policy!r} has unknown letter(s) {', '.join(map(repr, bad))}; "
        "valid letters are 'b' (blit: flip, rot90, integer shift), 'g' (geometric: scale, "
        "rotation, anisotropic scale, fractional shift), 'c' (colour: brightness, contrast, "
        "saturation), 'o' (cutout), combined like 'bg' or 'bgco', or '' for no augmentation")
  return policy


def _check_p(p) -> None:
  if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
    raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")


def _gate(key: jax.Array, value: jax.Array, identity, p) -> jax.Array:
  """`value` for the samples drawn with probability p (one draw per sample), else identity."""
  on_B = jax.random.uniform(key, value.shape[:1]) < p
  on = on_B.reshape(on_B.shape + (1,) * (value.ndim - 1))
  return jnp.where(on, value, jnp.asarray(identity, value.dtype))


def sample_params(key: jax.Array, batch: int, height: int, width: int, policy: str = "bgco",
                  p: float = DEFAULT_P) -> AugParams:
  """Draws the per-sample parameters of `policy` for a batch of HxW inputs."""
  check_policy(policy)
  _check_p(p)
  k = lambda i: jax.random.fold_in(key, i)  # one stream per transform, whatever the policy
  unif = lambda i, shape=(batch,): jax.random.uniform(k(i), shape, jnp.float32)
  normal = lambda i, shape=(batch,): jax.random.normal(k(i), shape, jnp.float32)
  out = {}
  if "b" in policy:
    out["xflip_B"] = _gate(k(100), jax.random.randint(k(0), (batch,), 0, 2), 0, p)
    out["rot90_B"] = _gate(k(101), jax.random.randint(k(1), (batch,), 0, 4), 0, p)
    t = (unif(2, (batch, 2)) * 2 - 1) * XINT_MAX * jnp.array([height, width], jnp.float32)
    out["shift_Bx2"] = _gate(k(102), jnp.round(t).astype(jnp.int32), 0, p)
  if "g" in policy:
    p_rot = 1 - jnp.sqrt(jnp.clip(1 - jnp.asarray(p, jnp.float32), 0, 1))
    theta = lambda i: (unif(i) * 2 - 1) * math.pi * ROTATE_MAX
    out["log2_scale_B"] = _gate(k(103), normal(3) * SCALE_STD, 0, p)
    out["theta_pre_B"] = _gate(k(104), theta(4), 0, p_rot)
    out["log2_aniso_B"] = _gate(k(105), normal(5) * ANISO_STD, 0, p)
    out["theta_post_B"] = _gate(k(106), theta(6), 0, p_rot)
    size = jnp.array([height, width], jnp.float32)
    out["frac_shift_Bx2"] = _gate(k(107), normal(7, (batch, 2)) * XFRAC_STD * size, 0, p)
  if "c" in policy:
    out["brightness_B"] = _gate(k(108), (unif(8) * 2 - 1) * BRIGHTNESS_MAX, 0, p)
    out["contrast_B"] = _gate(k(109), 1 + (unif(9) * 2 - 1) * CONTRAST_MAX, 1, p)
    out["saturation_B"] = _gate(k(110), unif(10) * SATURATION_MAX, 1, p)
  if "o" in policy:
    out["cutout_size_B"] = _gate(k(111), jnp.full((batch,), CUTOUT_SIZE, jnp.float32), 0, p)
    out["cutout_center_Bx2"] = unif(11, (batch, 2))
  return AugParams(**out)


# --------------------------------------------------------------------------- geometry


def _mm(m_Bx2x2: jax.Array, n_Bx2x2: jax.Array) -> jax.Array:
  return jnp.einsum("bij,bjk->bik", m_Bx2x2, n_Bx2x2, precision=_HI)


def _rot(t_B: jax.Array) -> jax.Array:
  """Inverse of a rotation by t (positive turns +x, the column axis, towards +y, down)."""
  c, s = jnp.cos(t_B), jnp.sin(t_B)
  return jnp.stack([jnp.stack([c, s], -1), jnp.stack([-s, c], -1)], -2)


def _diag(sx_B: jax.Array, sy_B: jax.Array) -> jax.Array:
  z = jnp.zeros_like(sx_B)
  return jnp.stack([jnp.stack([sx_B, z], -1), jnp.stack([z, sy_B], -1)], -2)


def geometric_matrix(params: AugParams, height: int, width: int) -> jax.Array:
  """Inverse affine map (output pixel -> input pixel, (x, y) = (col, row)) of groups 'b' and 'g'
  together, Bx2x3, about the image centre.

  Forward, in order: x-flip, np.rot90 by k quarter turns, integer shift (group 'b'); scale 2**s,
  rotate theta_pre, stretch (2**a, 2**-a), rotate theta_post, fractional shift (group 'g').
  Shifts move content by (rows, columns); a group absent from the policy is the identity.
  """
  inv_Bx2x2, shift_Bx2 = None, None  # accumulated: source = inv @ (q - c - shift) + c
  if params.log2_scale_B is not None:
    s, a = params.log2_scale_B, params.log2_aniso_B
    inv_Bx2x2 = _mm(_mm(_mm(_diag(jnp.exp2(-s), jnp.exp2(-s)), _rot(params.theta_pre_B)),
                        _diag(jnp.exp2(-a), jnp.exp2(a))), _rot(params.theta_post_B))
    fwd_Bx2x2 = _mm(_mm(_mm(_rot(-params.theta_post_B), _diag(jnp.exp2(a), jnp.exp2(-a))),
                        _rot(-params.theta_pre_B)), _diag(jnp.exp2(s), jnp.exp2(s)))
    shift_Bx2 = params.frac_shift_Bx2[:, ::-1].astype(jnp.float32)
  if params.xflip_B is not None:
    k = params.rot90_B % 4
    cos = jnp.select([k == 0, k == 2], [1.0, -1.0], 0.0)
    sin = jnp.select([k == 1, k == 3], [1.0, -1.0], 0.0)
    flip = jnp.where(params.xflip_B != 0, -1.0, 1.0)
    # Inverse of (flip, then rotate by k quarter turns as np.rot90): (u, v) -> (-v, u) per turn.
    blit_Bx2x2 = jnp.stack([jnp.stack([flip * cos, -flip * sin], -1),
                            jnp.stack([sin, cos], -1)], -2)
    int_shift = params.shift_Bx2[:, ::-1].astype(jnp.float32)
    if inv_Bx2x2 is None:
      inv_Bx2x2, shift_Bx2 = blit_Bx2x2, int_shift
    else:  # the blit happens first: undo 'g', then the integer shift, then the blit
      shift_Bx2 = shift_Bx2 + jnp.einsum("bij,bj->bi", fwd_Bx2x2, int_shift, precision=_HI)
      inv_Bx2x2 = _mm(blit_Bx2x2, inv_Bx2x2)
  centre = jnp.array([(width - 1) / 2, (height - 1) / 2], jnp.float32)
  offset_Bx2 = centre - jnp.einsum("bij,bj->bi", inv_Bx2x2, centre + shift_Bx2, precision=_HI)
  return jnp.concatenate([inv_Bx2x2, offset_Bx2[:, :, None]], axis=-1)


# --------------------------------------------------------------------------- application


def _per_sample(v_B: jax.Array) -> jax.Array:
  return v_B.reshape(-1, 1, 1, 1)


def _colour_identity(params: AugParams) -> jax.Array:
  """Per-sample flag: no colour transform fired (a reduction, see apply_params)."""
  coefs_Bx3 = jnp.stack([params.brightness_B, params.contrast_B, params.saturation_B], -1)
  return jnp.all(coefs_Bx3 == jnp.array([0.0, 1.0, 1.0]), axis=-1)


def colour(x_BxHxWxC: jax.Array, params: AugParams) -> jax.Array:
  """Brightness, then contrast, then saturation, in one closed-form pass (fp32 in, fp32 out)."""
  B, H, W, C = x_BxHxWxC.shape
  b = _per_sample(params.brightness_B)
  c = _per_sample(params.contrast_B)
  s = _per_sample(params.saturation_B)
  # Both means shift by b under brightness; contrast maps the pixel mean like any value.
  # The channel mean as a matmul: XLA:CPU reduces a 4-wide minor axis slowly.
  pixel_mean = jnp.einsum("bhwc,c->bhw", x_BxHxWxC, jnp.full((C,), 1 / C, jnp.float32),
                          precision=_HI)[..., None]
  mean = jnp.mean(pixel_mean, axis=(1, 2, 3), keepdims=True) + b
  pixel_mean = pixel_mean + b
  pixel_mean = (pixel_mean - mean) * c + mean
  x = (x_BxHxWxC + b - mean) * c + mean
  return (x - pixel_mean) * s + pixel_mean


def apply_params(params: AugParams, x_BxHxWxC: jax.Array) -> jax.Array:
  """Applies drawn parameters to one batch; computes in fp32, returns x's dtype."""
  B, H, W, C = x_BxHxWxC.shape
  x = x_BxHxWxC.astype(jnp.float32)
  if params.xflip_B is not None or params.log2_scale_B is not None:
    # Flags via one reduction: XLA materialises reductions, where chains of compares on the
    # raw draws get fused (and recomputed) into every per-pixel loop: 5x slower backward.
    zero_if_identity = []
    if params.xflip_B is not None:
      zero_if_identity += [params.shift_Bx2, jnp.stack([params.xflip_B, params.rot90_B % 4], -1)]
    if params.log2_scale_B is not None:
      zero_if_identity += [params.frac_shift_Bx2, jnp.stack(
          [params.log2_scale_B, params.theta_pre_B, params.log2_aniso_B, params.theta_post_B], -1)]
    identity_B = jnp.all(jnp.concatenate(
        [v.astype(jnp.float32) for v in zero_if_identity], axis=-1) == 0, axis=-1)
    warped = affine_resample(x, geometric_matrix(params, H, W))
    x = jnp.where(_per_sample(identity_B), x, warped)
  if params.brightness_B is not None:
    x = jnp.where(_per_sample(_colour_identity(params)), x, colour(x, params))
  if params.cutout_size_B is not None:
    half = _per_sample(params.cutout_size_B) / 2
    cy = _per_sample(params.cutout_center_Bx2[:, 0])
    cx = _per_sample(params.cutout_center_Bx2[:, 1])
    ry = (jnp.arange(H, dtype=jnp.float32).reshape(1, H, 1, 1) + 0.5) / H
    rx = (jnp.arange(W, dtype=jnp.float32).reshape(1, 1, W, 1) + 0.5) / W
    inside = (jnp.abs(ry - cy) < half) & (jnp.abs(rx - cx) < half)
    x = jnp.where(inside, 0.0, x)
  return x.astype(x_BxHxWxC.dtype)


def _check_input(x, name: str) -> None:
  if x.ndim != 4:
    raise ValueError(f"{name} must be an NHWC batch (B, H, W, C), got shape {tuple(x.shape)}")


def augment(key: jax.Array, x_BxHxWxC: jax.Array, policy: str = "bgco",
            p: float = DEFAULT_P) -> jax.Array:
  """One random augmentation per sample of `policy`; '' returns the input."""
  check_policy(policy)
  _check_input(x_BxHxWxC, "x")
  if not policy:
    return x_BxHxWxC
  B, H, W, _ = x_BxHxWxC.shape
  return apply_params(sample_params(key, B, H, W, policy, p), x_BxHxWxC)


def augment_pair(key: jax.Array, x_BxHxWxC: jax.Array, y_BxHxWxC: jax.Array,
                 policy: str = "bgco", p: float = DEFAULT_P) -> tuple[jax.Array, jax.Array]:
  """The same random augmentation on sample i of x and of y: `augment(key, .)` of each."""
  check_policy(policy)
  _check_input(x_BxHxWxC, "x")
  _check_input(y_BxHxWxC, "y")
  if x_BxHxWxC.shape != y_BxHxWxC.shape:
    raise ValueError(f"augment_pair needs x and y of the same shape, got "
                     f"{tuple(x_BxHxWxC.shape)} and {tuple(y_BxHxWxC.shape)}")
  if not policy:
    return x_BxHxWxC, y_BxHxWxC
  B, H, W, _ = x_BxHxWxC.shape
  params = sample_params(key, B, H, W, policy, p)
  # Two applications, not one on a stacked pair: XLA shares the index computations, and
  # a gradient taken for x alone does not pay for y's scatter.
  return apply_params(params, x_BxHxWxC), apply_params(params, y_BxHxWxC)
