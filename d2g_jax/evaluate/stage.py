"""The `eval` stage: the paper's table, one row per sampler, from prompts to metrics.

Legend: B batch, H/W/C latent height/width/channels, N samples, K diversity prompts,
S seeds per diversity prompt.

For every row of `config.eval.rows` (e.g. "teacher,student": the teacher's 50-step DDIM
with CFG and the one-step student, side by side):
  1. samples: prompt i (and noise `pair_noise(seed, i)`, the same for every row) ->
     the row's sampler -> latent x -> VAE decode -> 8-bit pixels -> per-sample
     features, all in one jitted step sharded over the mesh, written by
     `data.pairs.generate_pairs` as ArrayRecord shards in `<out_dir>/samples/<row>/`:
     `x` (the latent), `inception` (FID pool3, when FID is on), `clip_cosine` (when
     CLIP score is on), `dreamsim` (embedding, when DreamSim is on), plus the token ids.
     Resumable like the pairs stage: a killed run started again keeps every complete
     shard and generates only the rest; a finished row is not recomputed.
     Samples [0, N) are the main set (FID, CLIP score, fidelity); samples
     [N, N + K*S) repeat each of the first K prompts S times with distinct noise
     (diversity).
  2. metrics from the shards (process 0): FID against the reference statistics, CLIP
     score, fidelity to the reference row (`eval.fidelity_reference`, the teacher) and
     diversity; written to `<out_dir>/metrics.json` and TensorBoard (`<out_dir>/tb`,
     step `eval.step`), printed as a table, and `<out_dir>/grid.png`: the first
     `eval.grid_size` samples of every row, one row each, same prompts and noise.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from d2g_jax import files
from d2g_jax.data import pairs as pairs_lib
from d2g_jax.data.prompts import load_prompts
from d2g_jax.data.source import PairSource
from d2g_jax.data.teacher_pairs import teacher_fingerprint
from d2g_jax.evaluate import clip_score as clip_lib
from d2g_jax.evaluate import fid as fid_lib
from d2g_jax.evaluate import fidelity as fidelity_lib
from d2g_jax.evaluate import samplers as samplers_lib
from d2g_jax.files import save_json
from d2g_jax.grid import save_grid
from d2g_jax.infra import metrics as metrics_lib
from d2g_jax.log import get_logger

_log = get_logger(__name__)

READ_CHUNK = 256  # records read at a time when computing metrics


# ------------------------------------------------------------------ inputs
def eval_prompts(config) -> tuple[list[str], int]:
  """(every prompt to sample, N): the main set's N prompts, then the first K repeated S times."""
  e = config.eval
  if not e.prompts:
    raise ValueError("config.eval.prompts is empty; give a caption source: a .txt file (one "
                     "prompt a line), a .jsonl file, or tfds:coco_captions/2014/val")
  prompts = load_prompts(e.prompts, field=e.prompt_field or None,
                         data_dir=e.tfds_data_dir or None, caption_key=e.caption_key or None)
  n = len(prompts) if e.num_samples == -1 else e.num_samples
  if not 1 <= n <= len(prompts):
    raise ValueError(f"config.eval.num_samples={e.num_samples}, but {e.prompts} holds "
                     f"{len(prompts)} prompts; use 1..{len(prompts)}, or -1 for all")
  k, s = e.diversity_prompts, e.diversity_seeds
  if k and not (1 <= k <= n and s >= 2):
    raise ValueError(f"config.eval.diversity_prompts={k} must be in [0, {n}] and "
                     f"diversity_seeds={s} >= 2")
  return prompts[:n] + [p for p in prompts[:k] for _ in range(s)], n


def lpips_needed(config, names: list[str]) -> bool:
  """Whether the table has a column measured with E-LatentLPIPS: fidelity to the reference
  row (when another row is there to compare) or diversity."""
  e = config.eval
  return bool(e.diversity_prompts) or (e.fidelity_reference in names and len(set(names)) > 1)


def check_lpips_weights(config, names: list[str]) -> None:
  """Raises unless the E-LatentLPIPS the table needs has weights (or a random one is allowed)."""
  e = config.eval
  if not lpips_needed(config, names):
    return
  if not e.lpips_weights and not e.allow_random_lpips:
    raise ValueError("config.eval.lpips_weights is empty, but fidelity (eval.fidelity_reference) "
                     "or diversity (eval.diversity_prompts) is measured with E-LatentLPIPS: "
                     "give its weights ({encoder}_latest_vgg16_tuned.pth), or set "
                     "eval.allow_random_lpips=True to measure with a random network (not a "
                     "metric)")
  if e.lpips_weights and not os.path.exists(e.lpips_weights):
    raise FileNotFoundError(f"config.eval.lpips_weights={e.lpips_weights!r} does not exist; give "
                            "the E-LatentLPIPS weights ({encoder}_latest_vgg16_tuned.pth)")


class Metrics:
  """The per-sample networks of the eval step (each None when its metric is off)."""

  def __init__(self, config):
    e = config.eval
    self.inception = self.inception_params = self.clip = self.dreamsim = None
    self.meta: dict[str, Any] = {}
    if e.fid.inception_weights:
      from d2g_jax.convert.inception import load_inception
      self.inception, self.inception_params = load_inception(e.fid.inception_weights,
                                                             e.fid.normalize)
      self.inception_sha256 = files.file_sha256(e.fid.inception_weights)
      self.meta["inception"] = {"sha256": self.inception_sha256, "normalize": e.fid.normalize}
    if e.clip.path:
      self.clip = clip_lib.load_clip_scorer(e.clip.path)
      self.meta["clip"] = {"path": os.path.abspath(e.clip.path), "fingerprint": teacher_fingerprint(
          e.clip.path, sorted(os.listdir(e.clip.path)))}
    if e.dreamsim:
      self.dreamsim = fidelity_lib.dreamsim_embedder(e.dreamsim_cache)
      self.meta["dreamsim"] = {"dim": self.dreamsim[1]}

  def params(self) -> dict:
    return {"inception": self.inception_params, "clip": self.clip.params if self.clip else None}

  def encode(self, prompts) -> dict[str, np.ndarray]:
    return {"clip_input_ids": self.clip.tokenize(prompts)} if self.clip else {}

  def features(self, params, pixels_BxHxWx3, cond) -> dict[str, jax.Array]:
    out = {}
    if self.inception is not None:
      out["inception"] = fid_lib.fid_features(self.inception, params["inception"], pixels_BxHxWx3)
    if self.clip is not None:
      cos_B = self.clip.cosine(params["clip"], pixels_BxHxWx3, cond["clip_input_ids"])
      out["clip_cosine"] = cos_B[:, None]
    if self.dreamsim is not None:
      out["dreamsim"] = fidelity_lib.embed_in_jit(*self.dreamsim, pixels_BxHxWx3)
    return out


def _eval_generate(sampler: samplers_lib.Sampler, metrics: Metrics, params, z_BxHxWxC, cond):
  """Latents, then pixels, then every per-sample feature, for one batch (traced once)."""
  tokens = {k: v for k, v in cond.items() if k != "clip_input_ids"}
  x_BxHxWxC = sampler.generate_fn(params["sampler"], z_BxHxWxC, tokens)["x"]
  pixels = samplers_lib.decode_pixels(sampler, params["vae"], x_BxHxWxC)
  return {"x": x_BxHxWxC.astype(np.float32), **metrics.features(params["metrics"], pixels, cond)}


# ------------------------------------------------------------------ samples
def generate_row(config, name: str, prompts: list[str], metrics: Metrics) -> dict:
  """Generates (or resumes, or finds complete) one row's samples; returns
  {"manifest", "grid": uint8 GxHxWx3 of the first grid_size samples, "meta"}."""
  e = config.eval
  row = e[name]
  sampler = samplers_lib.make_sampler(row, config, name)
  out_dir = os.path.join(e.out_dir, "samples", name)
  meta = json.loads(json.dumps({"row": name, "sampler": sampler.meta, "metrics": metrics.meta,
                                "prompts": e.prompts, "num_samples": len(prompts)}))
  _log.info("row %s: %s -> %s", name, json.dumps(sampler.meta), out_dir)
  params = {"sampler": sampler.params, "vae": sampler.teacher.vae_params,
            "metrics": metrics.params()}
  encode_fn = lambda p: {**sampler.encode_fn(p), **metrics.encode(p)}
  manifest = pairs_lib.generate_pairs(
      out_dir, prompts, functools.partial(_eval_generate, sampler, metrics),
      latent_shape=sampler.latent_shape, seed=config.seed, batch_size=e.batch_size,
      shard_size=e.shard_size, manifest_meta=meta, params=params, encode_fn=encode_fn,
      store_noise=False)
  grid = None
  g = min(e.grid_size, len(prompts))
  if g and jax.process_index() == 0:
    x = np.stack([r["x"] for r in PairSource(out_dir).__getitems__(list(range(g)))])
    decode = jax.jit(functools.partial(samplers_lib.decode_pixels, sampler))
    grid = np.asarray(decode(sampler.teacher.vae_params, x)).astype(np.uint8)
  return {"manifest": manifest, "grid": grid, "meta": sampler.meta,
          "family": sampler.teacher.family}


# ------------------------------------------------------------------ metrics
def _read(source: PairSource, key: str, start: int, stop: int) -> np.ndarray:
  out = []
  for a in range(start, stop, READ_CHUNK):
    out += [np.asarray(r[key]) for r in source.__getitems__(list(range(a, min(a + READ_CHUNK,
                                                                              stop))))]
  return np.stack(out)


def _has(source: PairSource, key: str) -> bool:
  return key in source[0]


def reference_stats(config, metrics: Metrics) -> tuple[np.ndarray, np.ndarray, dict] | None:
  f = config.eval.fid
  if f.ref_stats:
    mu, sigma = fid_lib.load_stats(f.ref_stats)
    return mu, sigma, {"stats": os.path.abspath(f.ref_stats)}
  if not f.ref:
    return None
  return fid_lib.reference_statistics(
      f.ref, metrics.inception, metrics.inception_params,
      cache_dir=f.cache_dir or os.path.join(config.workdir, "fid_stats"),
      weights_sha256=metrics.inception_sha256, data_dir=f.ref_data_dir or None,
      image_key=f.ref_image_key, limit=f.ref_limit, center_crop=f.ref_center_crop,
      resolution=f.ref_resolution, batch_size=f.ref_batch_size)


def row_metrics(config, name: str, n: int, ref, lpips_distance) -> dict[str, Any]:
  """Every metric of one row from its shards (and the reference row's, for fidelity)."""
  e = config.eval
  src = PairSource(os.path.join(e.out_dir, "samples", name))
  out: dict[str, Any] = {"num_samples": n}
  if ref is not None and _has(src, "inception"):
    mu, sigma = fid_lib.statistics(_read(src, "inception", 0, n))
    out["fid"] = fid_lib.frechet_distance(mu, sigma, ref[0], ref[1])
  if _has(src, "clip_cosine"):
    out["clip_score"] = clip_lib.clip_score(_read(src, "clip_cosine", 0, n), e.clip.scale)
  teacher = e.fidelity_reference
  if teacher and teacher != name and teacher in rows(config):
    tsrc = PairSource(os.path.join(e.out_dir, "samples", teacher))
    dists = [lpips_distance(_read(src, "x", a, min(a + READ_CHUNK, n)),
                            _read(tsrc, "x", a, min(a + READ_CHUNK, n)))
             for a in range(0, n, READ_CHUNK)]
    out[f"lpips_to_{teacher}"] = float(np.mean(np.concatenate(dists)))
    if _has(src, "dreamsim"):
      out[f"dreamsim_to_{teacher}"] = float(np.mean(fidelity_lib.cosine_distance(
          _read(src, "dreamsim", 0, n), _read(tsrc, "dreamsim", 0, n))))
  k, s = e.diversity_prompts, e.diversity_seeds
  if k:
    out["diversity_lpips"] = fidelity_lib.diversity(lpips_distance,
                                                    _read(src, "x", n, n + k * s), k, s)
    if _has(src, "dreamsim"):
      out["diversity_dreamsim"] = fidelity_lib.diversity(
          fidelity_lib.cosine_distance, _read(src, "dreamsim", n, n + k * s), k, s)
  return out


def rows(config) -> list[str]:
  names = [r.strip() for r in config.eval.rows.split(",") if r.strip()]
  missing = [r for r in names if r not in config.eval or not hasattr(config.eval[r], "source")]
  if not names or missing:
    raise ValueError(f"config.eval.rows={config.eval.rows!r}: {missing or 'no rows'}; each row "
                     "is a block config.eval.<name> with source, path, num_steps, "
                     "guidance_scale, negative_prompt (see config_defaults.eval_row)")
  return names


# ------------------------------------------------------------------ output
COLUMNS = (("steps", "steps"), ("fid", "FID-{n}"), ("clip_score", "CLIP"),
           ("lpips_to_", "E-LatentLPIPS to {t}"), ("dreamsim_to_", "DreamSim to {t}"),
           ("diversity_lpips", "Div (E-LatentLPIPS)"), ("diversity_dreamsim", "DreamDiv"))


def table(results: dict[str, dict], n: int, teacher: str) -> str:
  """A markdown table in the paper's layout: one line per row."""
  keys = [k for k, _ in COLUMNS if any(any(m.startswith(k) for m in r) for r in results.values())]
  title = {k: t.format(n=n, t=teacher) for k, t in COLUMNS}
  lines = ["| row | " + " | ".join(title[k] for k in keys) + " |",
           "|---|" + "---|" * len(keys)]
  for name, r in results.items():
    cells = []
    for k in keys:
      v = next((r[m] for m in r if m.startswith(k)), None)
      cells.append("" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_tensorboard(folder: str, results: dict[str, dict], grid: np.ndarray | None, step: int):
  """The table's numbers and the sample grid as TensorBoard events (process 0 writes)."""
  with metrics_lib.MetricWriter(folder) as writer:
    writer.write_scalars(step, {f"eval/{name}/{k}": v for name, r in results.items()
                                for k, v in r.items()
                                if isinstance(v, (int, float)) and k != "steps"})
    if grid is not None:
      writer.write_images(step, {"eval/grid": grid})


def run_eval(config) -> dict:
  """The eval stage (see the module docstring). Returns the metrics dict written to JSON."""
  e = config.eval
  names = rows(config)
  check_lpips_weights(config, names)
  prompts, n = eval_prompts(config)
  _log.info(f"rows {names}; {n} samples per row from {e.prompts}"
        + (f" + {e.diversity_prompts} x {e.diversity_seeds} for diversity"
           if e.diversity_prompts else "") + f" -> {e.out_dir}")
  metrics = Metrics(config)
  for what, on in (("FID", metrics.inception is not None), ("CLIP score", metrics.clip is not None),
                   ("DreamSim", metrics.dreamsim is not None)):
    if not on:
      _log.info(f"{what} is off (" + {"FID": "set eval.fid.inception_weights",
                                          "CLIP score": "set eval.clip.path",
                                          "DreamSim": "set eval.dreamsim=True"}[what] + ")")
  ref = None  # first, so that a bad reference fails before hours of sampling
  if metrics.inception is not None and jax.process_index() == 0:
    ref = reference_stats(config, metrics)
    if ref is None:
      _log.info("FID skipped: no reference (set eval.fid.ref to a folder / tfds split, or "
            "eval.fid.ref_stats to an .npz)")
  generated = {name: generate_row(config, name, prompts, metrics) for name in names}
  if jax.process_index() != 0:
    return {}

  family = generated[names[0]]["family"]
  encoder = e.lpips_encoder or fidelity_lib.LPIPS_ENCODERS[family]
  lpips_distance = None  # only built for the columns that need it
  if lpips_needed(config, names):
    from d2g_jax.convert.lpips import load_latent_lpips
    lpips_module, lpips_params = load_latent_lpips(e.lpips_weights or None, encoder, augment=None)
    lpips_distance = fidelity_lib.latent_distance_fn(lpips_module, lpips_params)
  results = {}
  for name in names:
    r = {"steps": generated[name]["meta"].get("num_steps", 1)}
    r.update(row_metrics(config, name, n, ref, lpips_distance))
    results[name] = r
  grids = [generated[name]["grid"] for name in names if generated[name]["grid"] is not None]
  grid = save_grid(grids, os.path.join(e.out_dir, "grid.png")) if grids else None
  report = {"rows": results, "order": names,
            "samplers": {k: v["meta"] for k, v in generated.items()},
            "num_samples": n, "seed": int(config.seed), "prompts": e.prompts,
            "fid_reference": None if ref is None else ref[2],
            "clip_scale": float(e.clip.scale),
            "lpips": {"encoder": encoder,
                      "weights": e.lpips_weights or ("random (NOT a meaningful metric)"
                                                     if lpips_distance else None)},
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
  save_json(report, os.path.join(e.out_dir, "metrics.json"))
  write_tensorboard(os.path.join(e.out_dir, "tb"), results, grid, e.step)
  _log.info(table(results, n, e.fidelity_reference))
  _log.info("wrote %s, grid.png and tb/", os.path.join(e.out_dir, 'metrics.json'))
  return report
