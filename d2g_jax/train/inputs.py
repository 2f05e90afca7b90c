"""What the train stage reads, by `train.recipe`: the teacher's pairs (Diffusion2GAN) or
real latents with captions (GDD), as grain datasets of the batch fields the step uses.

    data = open_input(config)                 # manifest checks, before any model is loaded
    data.recompute_text                       # True: the step encodes token ids (frozen CLIP)
    keys = data.keys(teacher)                 # the batch fields the step reads
    ds = data.dataset(teacher, local_batch, seed=config.seed, verify="size")
    first = data.examples(teacher, n)         # the first n examples, host numpy (sample grids)

Pairs (`train.pairs`): records {"z", "x", "prompt_embeds" or token ids, ...} as the pairs
stage stored them; the pairs must come from the configured teacher (fingerprint checked).
Real latents (`real.out_dir`, the `real_latents` stage): each batch's captions are
tokenized on the host with the teacher's tokenizers (a grain map, so the checkpointed
iterator covers it) and "latent" becomes "x"; there is no "z": the step draws it. The
latents must come from the teacher's VAE (its folder's fingerprint is checked).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from d2g_jax import files
from d2g_jax.data import shards as fmt
from d2g_jax.data import source


def device_keys(record: dict, recompute_text: bool) -> list[str]:
  """The pair record fields the step reads (strings and indices stay on the host)."""
  keys = ["z", "x"] + [k for k in ("prompt_embeds", "pooled_prompt_embeds") if k in record]
  if recompute_text:
    keys += sorted(k for k in record if k.startswith(("input_ids", "attention_mask")))
  return keys


@dataclasses.dataclass(frozen=True)
class TrainInput:
  """A checked, complete dataset folder and how the step sees its records."""
  real: bool                      # real latents with captions (GDD) rather than pairs
  folder: str
  manifest: dict
  latent_shape: tuple[int, int, int]
  resolution: tuple[int, int] | None  # pixels, when the manifest says (SDXL's time_ids)

  @property
  def recompute_text(self) -> bool:
    return self.real or "prompt_embeds" not in self.manifest["record"]

  @property
  def num_examples(self) -> int:
    return int(self.manifest["num_examples"])

  def _transform(self, teacher) -> Callable[[dict], dict] | None:
    """Real latents: a batch of records -> {"x", token ids}; pairs: None (as stored)."""
    if not self.real:
      return None
    tokenize = teacher.tokenize

    def fn(batch: dict) -> dict:
      captions = [str(c) for c in np.asarray(batch["caption"]).reshape(-1)]
      return {"x": np.asarray(batch["latent"]), **tokenize(captions)}
    return fn

  def keys(self, teacher) -> list[str]:
    if not self.real:
      return device_keys(self.manifest["record"], self.recompute_text)
    return ["x"] + sorted(teacher.tokenize([""]))

  def dataset(self, teacher, batch_size: int, *, seed: int, verify: str):
    """This host's batches, shuffled and repeating (a grain MapDataset)."""
    ds = source.shard_dataset(self.folder, batch_size=batch_size, seed=seed, verify=verify)
    fn = self._transform(teacher)
    return ds if fn is None else ds.map(fn)

  def examples(self, teacher, n: int) -> dict[str, np.ndarray]:
    """The first min(n, size) examples as one batch of the step's fields."""
    src = source.ShardSource(self.folder, verify="none")
    records = src.__getitems__(range(min(n, len(src))))
    batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
    fn = self._transform(teacher)
    batch = batch if fn is None else fn(batch)
    return {k: batch[k] for k in self.keys(teacher)}


def _complete(manifest: dict, folder: str, what: str, stage: str) -> None:
  if manifest["status"] != "complete":
    raise ValueError(f"{folder}: the {what} is not complete; run the {stage} stage (same "
                     f"command with --config.stages={stage}) to finish it first")


def _pairs(config) -> TrainInput:
  folder = config.train.pairs
  manifest = fmt.read_manifest(folder)
  _complete(manifest, folder, "pair dataset", "pairs")
  meta = manifest["config"].get("meta", {})
  fingerprint = meta.get("teacher", {}).get("fingerprint")
  if fingerprint is not None:
    from d2g_jax.data.teacher_pairs import teacher_fingerprint
    if fingerprint != teacher_fingerprint(config.teacher.path):
      raise ValueError(f"{folder} was made by the teacher at "
                       f"{meta['teacher'].get('path')!r}, which differs from "
                       f"config.teacher.path={config.teacher.path!r} (fingerprints differ): "
                       "the student would start from another model than its targets' teacher")
  res = meta.get("resolution")
  return TrainInput(False, folder, manifest, tuple(manifest["config"]["latent_shape"]),
                    None if res is None else tuple(res))


def _real(config) -> TrainInput:
  folder = config.real.out_dir
  manifest = fmt.read_manifest(folder, fmt.LATENTS)
  _complete(manifest, folder, "real-latent cache", "real_latents")
  if "caption" not in manifest["record"]:
    raise ValueError(f"{folder} holds {sorted(manifest['record'])}, no captions: the GDD "
                     "recipe trains a text-conditioned generator; make the cache with "
                     "captions (real.caption_key or real.caption_template, real_latents stage)")
  meta = manifest["config"]["meta"]
  vae_dir = os.path.join(config.teacher.path, "vae")
  if meta.get("fingerprint") != files.fingerprint(vae_dir):
    raise ValueError(f"{folder} was encoded by the VAE at {meta.get('path')!r}, which differs "
                     f"from the teacher's {vae_dir!r} (fingerprints differ): the generator "
                     "would be trained towards another latent space; run the real_latents "
                     "stage again into a new real.out_dir")
  shape = source.ShardSource(folder, verify="none")[0]["latent"].shape
  size = manifest["config"]["image_size"]
  return TrainInput(True, folder, manifest, tuple(int(d) for d in shape), (size, size))


def open_input(config) -> TrainInput:
  """The checked dataset of `train.recipe` (pairs or real latents)."""
  return _real(config) if config.train.recipe == "gdd" else _pairs(config)


def describe(data: TrainInput) -> str:
  kind = "real latents (GDD)" if data.real else "pairs"
  return f"{data.num_examples} {kind} in {data.folder}"

