"""FID as clean-fid computes it: Inception pool3 features, Gaussian statistics, Frechet distance.

Legend: B batch, N images, D features (2048).

    features = fid_features(module, params, pixels_BxHxWx3)   # jit-able; pixels in [0, 255]
    mu, sigma = statistics(features_NxD)                      # float64, as clean-fid
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)

Protocol (clean-fid's "clean" mode): 8-bit images -> PIL bicubic resize to 299 x 299 on
float values (`evaluate.resize`) -> the TF FID Inception (`models.inception`, pytorch-fid's
weights) with (x - 128) / 128 input scaling -> 2048-d pool3 features. Statistics are the
float64 mean and `np.cov(rowvar=False)` of the float32 features; the distance is
||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)) with `scipy.linalg.sqrtm`, the
eps * I fallback for a singular product and the imaginary-part check of clean-fid's
`frechet_distance`.

Reference statistics (`reference_statistics`) come from a folder or a tfds split of real
images, computed once and cached as `.npz` (`mu`, `sigma`, the format clean-fid and
pytorch-fid use, so their precomputed files load too) under a name that hashes
everything that changes them: the source and its files, the preparation, the Inception
weights file and the input scaling.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.evaluate import images as images_lib
from d2g_jax.evaluate.fidelity import jitted_apply
from d2g_jax.evaluate.resize import fid_resize, resize_host
from d2g_jax.files import atomic_write
from d2g_jax.log import get_logger

_log = get_logger(__name__)

FID_SIZE = 299


def fid_features(module, params, pixels_BxHxWx3) -> jax.Array:
  """Pool3 features Bx2048 of 8-bit images (floats in [0, 255]), clean-fid's resize inside."""
  if pixels_BxHxWx3.shape[1:3] != (FID_SIZE, FID_SIZE):
    pixels_BxHxWx3 = fid_resize(pixels_BxHxWx3, FID_SIZE)
  return module.apply({"params": params}, pixels_BxHxWx3)


def statistics(features_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) in float64: `np.cov` as clean-fid; the mean accumulated in float64 (clean-fid's
  `np.mean` of float32 features stays float32, ~1e-7 relative apart)."""
  features_NxD = np.asarray(features_NxD)
  if features_NxD.ndim != 2 or features_NxD.shape[0] < 2:
    raise ValueError(f"statistics need at least 2 feature vectors as an NxD array; got shape "
                     f"{features_NxD.shape}")
  return np.mean(features_NxD, axis=0, dtype=np.float64), np.cov(features_NxD, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """The Frechet distance of two Gaussians, in float64, as clean-fid's `frechet_distance`."""
  from scipy import linalg
  mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
  sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():  # a singular product
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary component "
                       f"{np.max(np.abs(covmean.imag)):.3g}: too few samples for the dimension?")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------ files
def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, meta: dict | None = None):
  def write(tmp):
    with open(tmp, "wb") as fh:
      np.savez(fh, mu=mu, sigma=sigma, meta=json.dumps(meta or {}, sort_keys=True))
  atomic_write(path, write)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of a `.npz` holding `mu` and `sigma` (ours, clean-fid's or pytorch-fid's)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID statistics file {path!r} does not exist")
  with np.load(path) as f:
    if "mu" not in f or "sigma" not in f:
      raise ValueError(f"{path} holds {sorted(f.files)}; FID statistics need 'mu' and 'sigma'")
    return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


def _source_fingerprint(spec: str, data_dir: str | None) -> str:
  """Files by relative name and size (folders), or the tfds split's identity."""
  h = hashlib.sha256()
  if spec.startswith("tfds:"):
    h.update(f"{spec}\0{os.path.abspath(data_dir) if data_dir else ''}".encode())
  else:
    for f in images_lib.list_image_files(spec):
      h.update(f"{os.path.relpath(f, spec)}\0{os.path.getsize(f)}\0".encode())
  return h.hexdigest()


# ------------------------------------------------------------- references
def image_features(spec: str, module, params, *, data_dir: str | None = None,
                   image_key: str = "image", limit: int = -1, center_crop: bool = False,
                   resolution: int = 0, batch_size: int = 50, threads: int = 4) -> np.ndarray:
  """Nx2048 pool3 features of the images of `spec` (a folder or a tfds split), in order.

  Images are decoded and resized to 299 x 299 on the host with PIL (clean-fid's resize)
  by `threads` threads, then run through the Inception in batches of `batch_size` on
  the first local device (the last batch padded, so one shape is compiled).
  """
  n = images_lib.count_images(spec, data_dir=data_dir, limit=limit)
  batch_size = max(1, min(batch_size, n))
  apply = jitted_apply(module)
  params = jax.device_put(params, jax.local_devices()[0])

  def load(image):
    image = images_lib.prepare(image, center_crop, resolution)
    return resize_host(image, (FID_SIZE, FID_SIZE))

  def run(batch):
    pad = np.zeros((batch_size - len(batch), FID_SIZE, FID_SIZE, 3), np.float32)
    return np.asarray(apply(params, jnp.asarray(np.concatenate([np.stack(batch), pad]))))[
        :len(batch)]

  from tqdm import tqdm
  feats, batch = [], []
  stream = images_lib.iter_images(spec, data_dir=data_dir, image_key=image_key, limit=limit)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for pixels in tqdm(_bounded_map(pool, load, stream, 4 * threads), total=n, unit="img",
                       desc="FID features"):
      batch.append(pixels)
      if len(batch) == batch_size:
        feats.append(run(batch))
        batch = []
  if batch:
    feats.append(run(batch))
  return np.concatenate(feats)


def _bounded_map(pool, fn, items, ahead: int):
  """pool.map in order, with at most `ahead` items in flight (Executor.map reads all first)."""
  pending = collections.deque()
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= ahead:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


def reference_statistics(spec: str, module, params, *, cache_dir: str, weights_sha256: str,
                         data_dir: str | None = None, image_key: str = "image",
                         limit: int = -1, center_crop: bool = False, resolution: int = 0,
                         batch_size: int = 50, threads: int = 4) -> tuple[np.ndarray, np.ndarray,
                                                                          dict[str, Any]]:
  """(mu, sigma, info) of the real images of `spec`, computed once and cached in `cache_dir`.

  `weights_sha256` identifies the Inception weights (part of the cache key); the images
  go through `image_features`. Not resumable: a killed computation starts again.
  """
  key = {"source": spec if spec.startswith("tfds:") else os.path.abspath(spec),
         "files": _source_fingerprint(spec, data_dir), "image_key": image_key, "limit": limit,
         "center_crop": bool(center_crop), "resolution": int(resolution),
         "resize": f"clean-fid PIL bicubic float {FID_SIZE}", "normalize": module.normalize,
         "inception_sha256": weights_sha256}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir, f"fid_ref_{digest}.npz")
  if os.path.isfile(path):
    mu, sigma = load_stats(path)
    with np.load(path) as f:
      info = json.loads(str(f["meta"]))
    _log.info("FID reference statistics from the cache %s (%s images)",
              path, info.get('num_images'))
    return mu, sigma, {**info, "cache": path}
  _log.info("computing FID reference statistics of %s (cached in %s)", spec, path)
  features = image_features(spec, module, params, data_dir=data_dir, image_key=image_key,
                            limit=limit, center_crop=center_crop, resolution=resolution,
                            batch_size=batch_size, threads=threads)
  mu, sigma = statistics(features)
  info = {**key, "num_images": int(features.shape[0])}
  save_stats(path, mu, sigma, info)
  return mu, sigma, {**info, "cache": path}
