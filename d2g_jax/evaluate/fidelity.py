"""Fidelity to the teacher's ODE solution and diversity across seeds.

Legend: N samples, K prompts, S seeds per prompt, H/W/C latent height/width/channels,
D embedding width.

Fidelity: for the same noise z_i and prompt c_i, the distance between the student's
sample and the teacher's 50-step DDIM sample, averaged over i:
  * E-LatentLPIPS on the latents (`latent_distance`): the LatentLPIPS network of the
    teacher's latent space, augmentation off (a metric must be deterministic), the
    official package's L1 term included (`losses.perceptual`'s E-LatentLPIPS at eval);
  * DreamSim on the decoded images, when the user has the `dreamsim` package and its
    weights: 1 - cosine similarity of DreamSim embeddings (DreamSim's own distance).
Diversity (DreamDiv): for each of K prompts, S samples from different seeds; the mean
distance over the S(S-1)/2 pairs of a prompt, averaged over prompts (`diversity`).

DreamSim is optional and never a dependency: `dreamsim_embedder` imports it only when
asked (`config.eval.dreamsim=True`) and says how to install it otherwise. Its
embedding runs on the host (PyTorch) through `jax.pure_callback` inside the eval step,
on 224 x 224 images resized as its own preprocessing does (PIL bicubic on 8-bit).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

DREAMSIM_SIZE = 224
LPIPS_ENCODERS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}


@functools.lru_cache(maxsize=None)
def jitted_apply(module):
  """`jax.jit` of `module.apply({"params": p}, *args)`, one per (hashable) module, so that
  repeated evaluations reuse the compiled program."""
  return jax.jit(lambda p, *args: module.apply({"params": p}, *args))


def latent_distance_fn(module, params, batch_size: int = 16) -> Callable[[np.ndarray, np.ndarray],
                                                                        np.ndarray]:
  """(a_NxHxWxC, b_NxHxWxC) -> N LatentLPIPS distances (augmentation off), in batches."""
  apply = jitted_apply(module)

  def distance(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
      raise ValueError(f"latent shapes differ: {a.shape} vs {b.shape}")
    out = []
    for i in range(0, len(a), batch_size):
      n = min(batch_size, len(a) - i)
      pad = lambda x: np.concatenate([x[i:i + n], np.zeros((batch_size - n,) + x.shape[1:],
                                                              x.dtype)])
      out.append(np.asarray(apply(params, pad(a), pad(b)))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
  return distance


def cosine_distance(a_NxD: np.ndarray, b_NxD: np.ndarray) -> np.ndarray:
  """1 - cos(a_i, b_i), float64 (DreamSim's distance on its embeddings)."""
  a, b = np.asarray(a_NxD, np.float64), np.asarray(b_NxD, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return 1.0 - np.sum(a * b, axis=-1)


def pairs_within_groups(num_groups: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Index arrays (i, j), i < j inside each consecutive group of `group_size`."""
  i, j = np.triu_indices(group_size, k=1)
  base = (np.arange(num_groups) * group_size)[:, None]
  return (base + i).reshape(-1), (base + j).reshape(-1)


def diversity(distance: Callable[[np.ndarray, np.ndarray], np.ndarray], samples,
              num_groups: int, group_size: int) -> float:
  """Mean pairwise distance within groups (same prompt, different seeds), over groups.

  `samples[g * group_size + s]` is seed s of prompt g. Every group has the same number
  of pairs, so the mean over all pairs equals the mean of the per-prompt means.
  """
  if group_size < 2:
    raise ValueError(f"diversity needs at least 2 seeds per prompt; got {group_size}")
  i, j = pairs_within_groups(num_groups, group_size)
  samples = np.asarray(samples)
  return float(np.mean(distance(samples[i], samples[j])))


# ------------------------------------------------------------------ DreamSim
def dreamsim_embedder(cache_dir: str = "", device: str = "cpu") -> tuple[Callable, int]:
  """(embed, D): `embed(images_BxHxWx3 uint8) -> BxD float32` with DreamSim's ensemble."""
  try:
    from dreamsim import dreamsim
  except ImportError as e:
    raise ImportError("config.eval.dreamsim=True needs the `dreamsim` package and its weights, "
                      "which d2g_jax does not install: `pip install dreamsim` (it brings its own "
                      "dependencies), download its checkpoints once into a folder and set "
                      "config.eval.dreamsim_cache to it; or set config.eval.dreamsim=False") from e
  import torch
  kwargs = {"pretrained": True, "device": device}
  if cache_dir:
    kwargs["cache_dir"] = cache_dir
  try:
    model, _ = dreamsim(**kwargs)
  except Exception as e:  # noqa: BLE001 - a missing checkpoint surfaces as a download error
    raise FileNotFoundError(f"DreamSim could not load its weights (cache_dir={cache_dir!r}): {e}. "
                            "Download them once where there is network access and point "
                            "config.eval.dreamsim_cache at that folder.") from e
  model.eval()

  def embed(images):
    x = torch.from_numpy(np.asarray(images, np.float32) / 255.0).permute(0, 3, 1, 2).to(device)
    with torch.no_grad():
      return model.embed(x).float().cpu().numpy()

  dim = embed(np.zeros((1, DREAMSIM_SIZE, DREAMSIM_SIZE, 3), np.uint8)).shape[-1]
  return embed, int(dim)


def embed_in_jit(embed: Callable[[np.ndarray], np.ndarray], dim: int, pixels_BxHxWx3):
  """Host embedding of device images inside a jitted step (`jax.pure_callback`)."""
  from d2g_jax.evaluate.resize import resize
  x = resize(pixels_BxHxWx3, (DREAMSIM_SIZE, DREAMSIM_SIZE), quantize=True)
  out = jax.ShapeDtypeStruct((x.shape[0], dim), jnp.float32)
  host = lambda a: np.asarray(embed(np.asarray(a).astype(np.uint8)), np.float32)
  return jax.pure_callback(host, out, x, vmap_method="sequential")
