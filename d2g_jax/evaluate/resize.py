"""Image resizing exactly as PIL's antialiased bicubic does it, on the host or inside jit.

Legend: B batch, H/W input height/width, h/w output height/width, C channels.

clean-fid's "clean" mode (the FID protocol we follow) resizes every image to 299 x 299
with PIL: each channel as a float image (`mode="F"`), `Image.BICUBIC`, then clips to
[0, 255] (`cleanfid.resize.make_resizer("PIL", False, "bicubic", (299, 299))`). PIL's
resampling is separable: one 1-D filter per output pixel, the bicubic kernel (a = -0.5)
stretched by the downscale factor (antialiasing), normalised to sum to 1, applied along
the width first and then along the height. `resize_matrix` builds that filter bank as a
dense (out x in) matrix with PIL's own arithmetic (`precompute_coeffs` in PIL's
`Resample.c`: the same support, rounding of the window bounds and normalisation), so a
resize is two matrix products that run inside a jitted step on any device (`resize`).
PIL accumulates in float64, we in float32: about 1e-4 of the 0..255 range apart.
`resize_host` calls PIL itself, for images of any size read on the host (FID references).

`quantize=True` reproduces PIL on 8-bit images instead (what `CLIPImageProcessor` does to
uint8 images): after each pass the result is rounded and clipped to 0..255, as PIL's
8-bit path stores it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

BICUBIC_A = -0.5  # PIL's bicubic kernel parameter
BICUBIC_SUPPORT = 2.0


def _bicubic(x: np.ndarray) -> np.ndarray:
  x = np.abs(x)
  a = BICUBIC_A
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The (out_size x in_size) float64 matrix of PIL's antialiased bicubic resampling."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive; got {in_size} -> {out_size}")
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = BICUBIC_SUPPORT * filterscale
  m = np.zeros((out_size, in_size), np.float64)
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)  # C's (int) truncates towards zero, as int()
    xmax = min(int(center + support + 0.5), in_size)
    x = np.arange(xmin, xmax)
    w = _bicubic((x - center + 0.5) / filterscale)
    total = w.sum()
    m[xx, xmin:xmax] = w / total if total != 0.0 else w
  return m


def resize(images_BxHxWxC, size: tuple[int, int], quantize: bool = False):
  """Images (floats in [0, 255]) resized to `size` = (h, w); jnp in, jnp out (jit-able)."""
  _, H, W, _ = images_BxHxWxC.shape
  h, w = size
  wy_hxH = jnp.asarray(resize_matrix(H, h), jnp.float32)
  wx_wxW = jnp.asarray(resize_matrix(W, w), jnp.float32)
  fix = (lambda a: jnp.clip(jnp.floor(a + 0.5), 0, 255)) if quantize else (lambda a: a)
  x = images_BxHxWxC.astype(jnp.float32)
  x = fix(jnp.einsum("bHWc,wW->bHwc", x, wx_wxW, precision="highest"))
  x = fix(jnp.einsum("bHwc,hH->bhwc", x, wy_hxH, precision="highest"))
  return jnp.clip(x, 0, 255)


def resize_host(image_HxWxC: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """One image (uint8 or floats in [0, 255]) resized to `size` = (h, w) by PIL itself, each
  channel as a float image, clipped to [0, 255]: clean-fid's resize, float32 numpy."""
  from PIL import Image
  h, w = size
  channels = [np.asarray(Image.fromarray(np.asarray(image_HxWxC[..., c], np.float32))
                         .resize((w, h), resample=Image.BICUBIC))
              for c in range(image_HxWxC.shape[-1])]
  return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.float32)


def to_pixels(images_BxHxWxC):
  """Decoder output (about [-1, 1]) -> 8-bit values as floats in [0, 255], as diffusers
  writes images: clamp (x / 2 + 0.5) to [0, 1], times 255, rounded."""
  x = jnp.clip(images_BxHxWxC.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)
  return jnp.round(x * 255.0)


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """transformers' `get_resize_output_image_size(default_to_square=False)`: the shorter
  side becomes `shortest_edge`, the longer one keeps the aspect ratio (truncated)."""
  short, long = min(height, width), max(height, width)
  new_long = int(shortest_edge * long / short)
  return (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)


def center_crop(images_BxHxWxC, size: tuple[int, int]):
  """transformers' `center_crop` for crops no larger than the image."""
  _, H, W, _ = images_BxHxWxC.shape
  h, w = size
  if h > H or w > W:
    raise ValueError(f"crop {size} is larger than the image ({H}, {W})")
  top, left = (H - h) // 2, (W - w) // 2
  return images_BxHxWxC[:, top:top + h, left:left + w]


def fid_resize(images_BxHxWxC, size: int = 299):
  """clean-fid's "clean" resize: PIL bicubic on float images, clipped to [0, 255]."""
  return resize(images_BxHxWxC, (size, size), quantize=False)
