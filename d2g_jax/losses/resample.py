"""Anti-aliased affine resampling of NHWC images, the geometric pipeline of ADA.

Legend: B batch, H/W height/width, C channels, P reflect margin, L = 2 * (H + 2P) (rows of the
upsampled, padded image), E extra 2x samples each side that the downsampling filter reads.

StyleGAN2-ADA (Karras et al. 2020, arXiv 2006.06676, appendix B) applies all its geometric
augmentations as one resample of the composed matrix: pad the image by reflection, upsample it
2x with the 12-tap low-pass filter of Daubechies' symlet-6 wavelet (`sym6`), sample the
transformed image bilinearly at the 2x resolution, low-pass filter with the same wavelet and
downsample back. The 2x detour keeps bilinear interpolation from blurring: a plain bilinear
resample at a half-pixel offset averages neighbours (a strong low-pass on noise-like latents).

Conventions here (pinned down against the `elatentlpips` package by black-box measurement,
`tests/test_augment_official.py`): the margin is the largest a reflection can give (H - 1 rows, W - 1
columns), the upsampler spreads input pixel k over 2x samples 2k - 5 .. 2k + 6 with weights
2 * SYM6, the downsampler is its adjoint (so downsample(upsample(x)) = x: sym6 is orthogonal),
and whatever falls outside the padded image reads zero. Because sym6 is not symmetric, every
non-trivial map is realised about a centre PHASE / 2 = 0.049 pixel up-left of the image centre
(a flip moves content by 0.098 pixel), as in the official pipeline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Low-pass (scaling) filter of the symlet-6 wavelet, normalised to sum 1 (PyWavelets
# `Wavelet("sym6").dec_lo / sqrt(2)`; checked against it in the tests).
SYM6 = np.array([
    0.010892349, 0.0024683059, -0.0834316, -0.03416156, 0.34722894, 0.5569464,
    0.23895217, -0.05136248, -0.014891874, 0.03162528, 0.001249961, -0.0055159335],
    np.float64)
SYM6 = SYM6 / SYM6.sum()
_TAPS = len(SYM6)
_LAG = 5   # input pixel k feeds 2x samples 2k - _LAG .. 2k - _LAG + 11
EXTRA = 5  # 2x samples outside the 2x output grid that the downsampler reads, each side
# Upsampling a linear ramp k -> k gives (j - PHASE) / 2 at 2x sample j (sym6's group delay).
PHASE = float(np.dot(np.arange(_TAPS), SYM6)) - _LAG

_HI = jax.lax.Precision.HIGHEST


def _taps(x: jax.Array, axis: int, weights, starts, length: int) -> jax.Array:
  """sum_i weights[i] * x[starts[i] : starts[i] + length] along `axis` (static slices: XLA fuses
  them into one loop, where a depthwise or dilated convolution runs ~100x slower on CPU)."""
  out = 0.0
  for w, s in zip(weights, starts):
    out = out + float(w) * jax.lax.slice_in_dim(x, s, s + length, axis=axis)
  return out


def _up_along(x: jax.Array, axis: int, ext: int = 0) -> jax.Array:
  """2x upsampling along `axis` (n -> 2n + 4 ext): 2x sample j, for j in [-2 ext, 2n + 2 ext),
  is the sum over 2k + t - _LAG = j of 2 SYM6[t] x[k], x zero outside."""
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (3 + ext, 3 + ext)
  xp = jnp.pad(x, pad)
  # Even samples 2m read x[m + (_LAG - t) / 2] for odd t, odd samples x[m + (_LAG + 1 - t) / 2].
  length = n + 2 * ext
  even = _taps(xp, axis, 2 * SYM6[1::2], [3 + (_LAG - t) // 2 for t in range(1, _TAPS, 2)], length)
  odd = _taps(xp, axis, 2 * SYM6[0::2], [3 + (_LAG + 1 - t) // 2 for t in range(0, _TAPS, 2)],
              length)
  y = jnp.stack([even, odd], axis=axis + 1)
  return y.reshape(x.shape[:axis] + (2 * length,) + x.shape[axis + 1:])


def _down_along(z: jax.Array, axis: int) -> jax.Array:
  """2x downsampling along `axis` (length 2n + 2 EXTRA -> n): out[m] = sum_t SYM6[t] z[2m + t]."""
  n = (z.shape[axis] - 2 * EXTRA) // 2
  phases = z.reshape(z.shape[:axis] + (n + EXTRA, 2) + z.shape[axis + 1:])
  out = 0.0
  for r in (0, 1):
    phase = jax.lax.index_in_dim(phases, r, axis=axis + 1, keepdims=False)
    out = out + _taps(phase, axis, SYM6[r::2], range(_TAPS // 2), n)
  return out


# Each filter's adjoint is the other one (up to the gain and the frame): written out, so that
# gradients run as fast as the forward pass (XLA:CPU's transpose of strided slices is ~100x
# slower than the slices).
def _up_adjoint(y: jax.Array, axis: int) -> jax.Array:
  pad = [(0, 0)] * y.ndim
  pad[axis] = (EXTRA, EXTRA)
  return 2.0 * _down_along(jnp.pad(y, pad), axis)


def _down_adjoint(out: jax.Array, axis: int) -> jax.Array:
  n = out.shape[axis]  # 2x samples -6 .. 2n + 5, of which -EXTRA .. 2n + EXTRA - 1 are wanted
  return 0.5 * jax.lax.slice_in_dim(_up_along(out, axis, ext=3), 1, 2 * n + 11, axis=axis)


def _linear_with_adjoint(forward, adjoint):
  """`forward` (a linear map) with `adjoint` as its backward pass."""
  fn = jax.custom_vjp(forward)
  fn.defvjp(lambda x: (fn(x), None), lambda _, g: (adjoint(g),))
  return fn


def _upsample2x(x_BxHxWxC: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, 2H, 2W, C): zero-stuffing and the sym6 filter (gain 4); zeros outside."""
  return _up_along(_up_along(x_BxHxWxC, 1), 2)


def _downsample2x(z_BxHxWxC: jax.Array) -> jax.Array:
  """(B, 2H + 2 EXTRA, 2W + 2 EXTRA, C) -> (B, H, W, C): the adjoint of `upsample2x`, / 4.

  Output pixel m reads 2x samples 2m - 5 .. 2m + 6, where 2x sample 0 is input index EXTRA.
  """
  return _down_along(_down_along(z_BxHxWxC, 1), 2)


upsample2x = _linear_with_adjoint(_upsample2x, lambda g: _up_adjoint(_up_adjoint(g, 1), 2))
downsample2x = _linear_with_adjoint(_downsample2x,
                                    lambda g: _down_adjoint(_down_adjoint(g, 1), 2))


def _bilinear_zeros(img_BxLxMxC: jax.Array, xs_BxN: jax.Array, ys_BxN: jax.Array) -> jax.Array:
  """Bilinear samples at (x = column, y = row), pixel centres at integers; zero outside."""
  B, L, M, C = img_BxLxMxC.shape
  x0, y0 = jnp.floor(xs_BxN), jnp.floor(ys_BxN)
  fx, fy = xs_BxN - x0, ys_BxN - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  flat = img_BxLxMxC.reshape(B, L * M, C)
  idx, wts = [], []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      r, c = y0 + dy, x0 + dx
      inside = (r >= 0) & (r < L) & (c >= 0) & (c < M)
      idx.append(jnp.clip(r, 0, L - 1) * M + jnp.clip(c, 0, M - 1))
      wts.append(jnp.where(inside, wy * wx, 0.0))
  idx_Bx4N = jnp.concatenate(idx, axis=1)
  w_Bx4Nx1 = jnp.concatenate(wts, axis=1)[..., None]
  picked = jax.vmap(lambda img, i: img[i])(flat, idx_Bx4N) * w_Bx4Nx1
  return sum(jnp.split(picked, 4, axis=1))


def affine_resample(x_BxHxWxC: jax.Array, inv_Bx2x3: jax.Array) -> jax.Array:
  """out[b] = x[b] warped by the inverse map `inv[b]`: output pixel (col, row) = (c, r) shows
  input position inv[b] @ (c, r, 1), pixel centres at integers, with ADA's anti-aliasing.

  Reflect padding (edge pixels not repeated) up to H - 1 rows / W - 1 columns, zeros beyond.
  Input and output have the same size; computed in fp32.
  """
  B, H, W, C = x_BxHxWxC.shape
  pad_h, pad_w = H - 1, W - 1
  x = jnp.pad(x_BxHxWxC.astype(jnp.float32), ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)),
              mode="reflect")
  up_BxLxMxC = upsample2x(x)
  # The 2x output grid, EXTRA samples beyond each side; 2x sample j sits at pixel j / 2.
  rows = jnp.arange(-EXTRA, 2 * H + EXTRA, dtype=jnp.float32)
  cols = jnp.arange(-EXTRA, 2 * W + EXTRA, dtype=jnp.float32)
  r2, c2 = jnp.meshgrid(rows, cols, indexing="ij")
  grid_3xN = jnp.stack([c2.ravel(), r2.ravel(), jnp.ones(r2.size, jnp.float32)])
  # At 2x: source = lin @ q2 + 2 * offset; then into the padded image's 2x frame.
  inv = inv_Bx2x3.astype(jnp.float32)
  inv2 = jnp.concatenate([inv[:, :, :2], 2 * inv[:, :, 2:] + jnp.array(
      [[2.0 * pad_w], [2.0 * pad_h]], jnp.float32)], axis=-1)
  # A matmul (exact at HIGHEST) rather than elementwise: XLA then computes the per-sample
  # matrix once instead of fusing its trigonometry and RNG into every per-pixel loop.
  xy_Bx2xN = jnp.einsum("bij,jn->bin", inv2, grid_3xN, precision=_HI)
  warped = _bilinear_zeros(up_BxLxMxC, xy_Bx2xN[:, 0], xy_Bx2xN[:, 1])
  return downsample2x(warped.reshape(B, rows.size, cols.size, C))
