"""The `latent_vgg_calibrate` stage: E-LatentLPIPS's 1x1 heads calibrated on BAPPS 2AFC
judgments with the trunk frozen, by LPIPS's ranking objective (Zhang et al., CVPR 2018).

Legend: N triplets, B batch, F = sum of the trunk widths (1472 for VGG16), K taps (5).

1. Features. For each cached triplet (ref, p0, p1 latents) the trunk's five taps, unit-
   normalised over channels; per tap and channel the spatial mean of the squared difference
   to ref: f0 (ref vs p0) and f1 (ref vs p1), N x F each. A head is a 1x1 convolution followed
   by a spatial mean, so the LatentLPIPS distance (without its L1 term) is exactly d = w . f
   with w the F head weights: training on f is training LPIPS's heads, at a fraction of the
   cost. Computed once per split, data-parallel, kept in <out>/calibrate/features_<split>.npz.
2. Heads. w (F,) and the judgment network `RankNet` G(d0, d1) predict the human judgment h
   (fraction who chose p1) with binary cross-entropy; Adam (lr 1e-4, beta1 0.5), `epochs` at
   the full rate then `decay_epochs` linearly to 0, batches of `batch_size`, a new order each
   epoch; w clamped at 0 after every step, as LPIPS does. w starts as LPIPS's heads do
   (PyTorch's 1x1-conv init, U(+-1/sqrt(C))). `dropout` > 0 drops feature channels; LPIPS drops
   feature-map pixels before the head, which has no exact counterpart on the pooled f (off
   by default). A checkpoint per epoch; a restart resumes at the last one, exactly.
3. 2AFC score per distortion family on val and train: mean over triplets of
   h [d1 < d0] + (1 - h) [d0 < d1] + 0.5 [d0 = d1] (the brief's h is our 1 - h: BAPPS's judge
   files hold the fraction preferring p1), for the calibrated heads and the uncalibrated
   all-ones heads; `mean` averages the families.

Outputs: <out>/{encoder}_elatentlpips.safetensors (config.loss.weights=<out> loads it),
<out>/ckpt/{encoder}_latest_vgg16_tuned.pth (the official file; VGG16 widths and torch only),
<out>/calibrate_results.json.
"""

from __future__ import annotations

import functools
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from d2g_jax import distributed, files, lock, parallel
from d2g_jax.convert import lpips as convert_lpips
from d2g_jax.data import source
from d2g_jax.data.latent_cache import BAPPS_SPLITS, paths
from d2g_jax.data.writer import sha256_json
from d2g_jax.infra import checkpoint, metrics, run_config
from d2g_jax.log import get_logger
from d2g_jax.models.latent_vgg import LPIPS, VGG16, normalize_channels
from d2g_jax.models.lpips_rank import RankNet

_log = get_logger(__name__)

RESULTS = "calibrate_results.json"
RESTART_IGNORE = ("calibrate.feature_batch_size",)


# ------------------------------------------------------------------ features
def pair_features(module: LPIPS, net_params, ref, p0, p1) -> tuple[jax.Array, jax.Array]:
  """(f0_BxF, f1_BxF): per tap and channel, the spatial mean of the squared difference of the
  unit-normalised features of ref and p0 (p1). d = f @ w is LatentLPIPS without L1."""
  cfg = module.config
  b = ref.shape[0]
  taps = VGG16(cfg.vgg).apply({"params": net_params},
                              jnp.concatenate([ref, p0, p1]).astype(jnp.float32))
  f0, f1 = [], []
  for t in taps:
    n = normalize_channels(t, cfg.norm_eps, cfg.eps_inside_sqrt)
    r, a, c = n[:b], n[b:2 * b], n[2 * b:]
    f0.append(jnp.mean(jnp.square(r - a), axis=(1, 2)))
    f1.append(jnp.mean(jnp.square(r - c), axis=(1, 2)))
  return jnp.concatenate(f0, -1), jnp.concatenate(f1, -1)


def extract(fn, net_params, data: source.ShardSource, batch_size: int, mesh
            ) -> dict[str, np.ndarray]:
  """{"f0", "f1" (NxF float32), "judge" (N), "distortion" (N str)} of a cached BAPPS split;
  `fn` is the jitted `pair_features` of the module.

  Each host computes its rows of every global batch; the result is gathered on every host.
  """
  b = parallel.local_batch_size(batch_size, mesh)
  shape = data[0]["ref"].shape
  base = jax.process_index() * b
  f0s, f1s = [], []
  for start in range(0, len(data), batch_size):
    rows = [i for i in range(start + base, start + base + b) if i < len(data)]
    recs = data.__getitems__(rows) if rows else []
    x = {k: np.zeros((b, *shape), np.float32) for k in ("ref", "p0", "p1")}
    for r, rec in enumerate(recs):
      for k in x:
        x[k][r] = rec[k]
    glob = parallel.host_to_global(x, mesh)
    f0, f1 = fn(net_params, glob["ref"], glob["p0"], glob["p1"])
    if jax.process_count() > 1:
      f0, f1 = multihost_utils.process_allgather((f0, f1), tiled=True)
    f0s.append(np.asarray(f0)[:len(data) - start])
    f1s.append(np.asarray(f1)[:len(data) - start])
  judge, dist = [], []  # every host needs them all (it trains on every triplet)
  for start in range(0, len(data), 1024):
    for rec in data.__getitems__(range(start, min(start + 1024, len(data)))):
      judge.append(rec["judge"])
      dist.append(rec["distortion"])
  return {"f0": np.concatenate(f0s), "f1": np.concatenate(f1s),
          "judge": np.asarray(judge, np.float32), "distortion": np.asarray(dist)}


def _features(fn, net_params, split_dir, path, tag, batch_size, mesh) -> dict:
  """The features of a split, from `path` when it holds this `tag` (trunk + cache), else
  computed and saved (process 0, atomically)."""
  if os.path.isfile(path):
    with np.load(path, allow_pickle=False) as z:
      if str(z["tag"]) == tag:
        return {k: z[k] for k in ("f0", "f1", "judge", "distortion")}
  feats = extract(fn, net_params, source.ShardSource(split_dir), batch_size, mesh)
  if jax.process_index() == 0:
    files.atomic_write(path, lambda tmp: _savez(tmp, tag=np.asarray(tag), **feats))
  return feats


def _savez(tmp: str, **arrays):
  with open(tmp, "wb") as fh:
    np.savez(fh, **arrays)


# ------------------------------------------------------------------ scores
def two_afc(d0: np.ndarray, d1: np.ndarray, judge: np.ndarray) -> np.ndarray:
  """Per-triplet agreement with people: h [d1 < d0] + (1 - h) [d0 < d1] + 0.5 [d0 = d1]."""
  d0, d1 = np.asarray(d0, np.float64), np.asarray(d1, np.float64)
  return (d1 < d0) * judge + (d0 < d1) * (1.0 - judge) + (d0 == d1) * 0.5


def scores(w: np.ndarray, feats: dict) -> dict:
  """2AFC score of heads `w` per distortion family, their mean, and over all triplets."""
  s = two_afc(feats["f0"] @ w, feats["f1"] @ w, feats["judge"])
  per = {str(d): float(np.mean(s[feats["distortion"] == d]))
         for d in sorted(set(feats["distortion"].tolist()))}
  return {"per_family": per, "mean": float(np.mean(list(per.values()))),
          "all": float(np.mean(s)), "num_triplets": int(len(s))}


# ------------------------------------------------------------------ training
def init_state(rank: RankNet, tx, widths, seed: int, mesh) -> dict:
  def init():
    key = jax.random.key(seed)
    ws = [jax.random.uniform(jax.random.fold_in(key, k), (c,), jnp.float32, -1 / np.sqrt(c),
                             1 / np.sqrt(c)) for k, c in enumerate(widths)]
    params = {"w": jnp.concatenate(ws),
              "rank": rank.init(jax.random.fold_in(key, 99), jnp.ones((1,)), jnp.ones((1,)))}
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def calibrate_step(rank: RankNet, tx, dropout: float, seed: int, state: dict, batch: dict):
  """One Adam step on {"f0", "f1" (BxF), "judge" (B)}; the heads clamped at 0 after it."""
  key = jax.random.fold_in(jax.random.key(seed), state["step"])

  def loss_fn(params):
    f0, f1, w = batch["f0"], batch["f1"], params["w"]
    if dropout > 0:
      keep = 1.0 - dropout
      f0 = f0 * jax.random.bernoulli(jax.random.fold_in(key, 0), keep, f0.shape) / keep
      f1 = f1 * jax.random.bernoulli(jax.random.fold_in(key, 1), keep, f1.shape) / keep
    logit = rank.apply(params["rank"], f0 @ w, f1 @ w)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logit, batch["judge"]))

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  params = {**params, "w": jnp.maximum(params["w"], 0.0)}  # heads stay non-negative
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, {"loss": loss}


def lr_schedule(c, steps_per_epoch: int) -> optax.Schedule:
  """LPIPS's: `lr` for `epochs`, then linearly to 0 over `decay_epochs` (per epoch)."""
  def schedule(step):
    epoch = step // steps_per_epoch  # 0-based; LPIPS's epoch e + 1
    if c.decay_epochs <= 0:
      return c.lr * jnp.ones_like(epoch, jnp.float32)
    return c.lr * (1.0 - jnp.clip((epoch - c.epochs) / c.decay_epochs, 0.0, 1.0))
  return schedule


def heads_params(w: np.ndarray, widths) -> dict:
  """The flat heads -> LPIPS's `lin{k}/model_1/kernel` (1x1xCx1)."""
  bounds = np.cumsum([0, *widths])
  return {f"lin{k}": {"model_1": {"kernel": np.asarray(w[bounds[k]:bounds[k + 1]],
                                                     np.float32).reshape(1, 1, -1, 1)}}
          for k in range(len(widths))}


# ------------------------------------------------------------------ the stage
def _trunk(config, p) -> tuple[str, LPIPS, dict]:
  lv = config.latent_vgg
  path = lv.calibrate.trunk or p["trunk"]
  if not os.path.exists(path):
    raise FileNotFoundError(f"no trunk to calibrate at {path}: run the latent_vgg_train stage "
                            "first, or set config.latent_vgg.calibrate.trunk to a trunk file "
                            "(e.g. an official {encoder}_latent_vgg16.pth.tar)")
  path = convert_lpips.find_weights(path, lv.encoder)
  with warnings.catch_warnings():  # the heads are about to be calibrated
    warnings.filterwarnings("ignore", message=".*(trunk only|uncalibrated).*")
    module, params = convert_lpips.load_latent_lpips(path, lv.encoder, augment=None)
  return path, module, params


def run_calibrate(config) -> dict:
  """Calibrates the heads on <out>/cache/bapps_{train,val}; returns the results dict."""
  lv, c = config.latent_vgg, config.latent_vgg.calibrate
  p = paths(config)
  trunk_path, module, lpips_params = _trunk(config, p)
  widths = module.config.vgg.widths
  splits = {}
  for s in BAPPS_SPLITS:
    try:
      splits[s] = source.ShardSource(p[f"bapps_{s}"])
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e}. Run the latent_cache stage with config.latent_vgg.cache."
                              "bapps set to a BAPPS root (2afc/train, 2afc/val) first.") from e
  rc = {"seed": config.seed, "encoder": lv.encoder, "calibrate": c.to_dict(),
        "trunk": files.fingerprint(trunk_path),
        "caches": {s: src.manifest["config_sha256"] for s, src in splits.items()}}
  results_path = os.path.join(p["out"], RESULTS)
  if os.path.isfile(results_path):
    done = files.load_json(results_path, "calibration results")
    if done.get("run_config_sha256") == sha256_json(rc):
      _log.info("already calibrated: val 2AFC %.4f (%s)", done['val']['mean'], results_path)
      return done
  mesh = parallel.make_mesh()
  os.makedirs(p["calibrate"], exist_ok=True)
  run_config.ensure(p["calibrate"], rc, ignore=RESTART_IGNORE, process_index=jax.process_index())
  start_time = time.time()
  net = jax.device_put(lpips_params["net"], parallel.replicated(mesh))
  features_fn = jax.jit(functools.partial(pair_features, module))
  feats = {s: _features(features_fn, net, p[f"bapps_{s}"],
                        os.path.join(p["calibrate"], f"features_{s}.npz"),
                        sha256_json([rc["trunk"], rc["caches"][s]]), c.feature_batch_size, mesh)
           for s in BAPPS_SPLITS}
  train = feats["train"]
  n = len(train["judge"])
  steps_per_epoch = n // c.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.latent_vgg.calibrate.batch_size={c.batch_size} exceeds the {n} "
                     "BAPPS training triplets")
  num_epochs = c.epochs + c.decay_epochs
  b = parallel.local_batch_size(c.batch_size, mesh)
  rank = RankNet(c.hidden)
  tx = optax.adam(lr_schedule(c, steps_per_epoch), b1=c.beta1)
  step_fn = jax.jit(functools.partial(calibrate_step, rank, tx, c.dropout, config.seed),
                    donate_argnums=0)
  _log.info("trunk %s; %s train / %s val triplets, %s head weights; %s epochs of %s steps",
            trunk_path, n, len(feats['val']['judge']), train['f0'].shape[1], num_epochs,
            steps_per_epoch)
  with lock.FolderLock(p["calibrate"], process_index=jax.process_index()), \
      checkpoint.Checkpointer(os.path.join(p["calibrate"], "checkpoints"), max_to_keep=2) as ckpt, \
      metrics.MetricWriter(os.path.join(p["calibrate"], "tb")) as writer:
    state = init_state(rank, tx, widths, config.seed, mesh)
    if (latest := ckpt.latest_step()) is not None:
      state = ckpt.restore(latest, checkpoint.abstract_like(state))
      _log.info("resumed at epoch %s", latest // steps_per_epoch)
    lo = jax.process_index() * b
    compiled = False
    for epoch in range(int(state["step"]) // steps_per_epoch, num_epochs):
      order = np.random.default_rng([config.seed, epoch]).permutation(n)
      losses = []
      for i in range(steps_per_epoch):
        rows = order[i * c.batch_size + lo:i * c.batch_size + lo + b]
        batch = {"f0": train["f0"][rows], "f1": train["f1"][rows], "judge": train["judge"][rows]}
        batch = parallel.host_to_global(batch, mesh)
        if not compiled:  # this run's first step
          distributed.compile_then_wait(step_fn, state, batch, name="latent_vgg_calibrate step")
          compiled = True
        state, out = step_fn(state, batch)
        losses.append(out["loss"])
      step = (epoch + 1) * steps_per_epoch
      loss = metrics.to_floats(step, {"loss": jnp.mean(jnp.stack(losses))})["loss"]
      val = scores(np.asarray(jax.device_get(state["params"]["w"])), feats["val"])
      writer.write_scalars(step, {"calibrate/bce": loss, "calibrate/val_2afc": val["mean"]})
      _log.info("epoch %d/%d: bce %.4f, val 2AFC %.4f", epoch + 1, num_epochs, loss,
                  val["mean"])
      ckpt.save(step, state)
    ckpt.wait()
  w = np.asarray(jax.device_get(state["params"]["w"]))
  ones = np.ones_like(w)
  result = {s: {**scores(w, feats[s]), "uncalibrated": scores(ones, feats[s])}
            for s in BAPPS_SPLITS}
  result.update(trunk=trunk_path, epochs=num_epochs, steps=int(state["step"]),
                seconds_this_run=time.time() - start_time, run_config_sha256=sha256_json(rc))
  if jax.process_index() == 0:
    params = {"net": jax.device_get(lpips_params["net"]), **heads_params(w, widths)}
    convert_lpips.save_lpips(module, params, p["weights"])
    result["outputs"] = {"weights": p["weights"]}
    try:
      result["outputs"]["official"] = convert_lpips.export_official(module, params,
                                                                    p["official"])
    except convert_lpips.ConversionError as e:  # narrow trunk, or no torch
      _log.warning("no official E-LatentLPIPS file: %s", e)
    files.save_json(result, results_path)
  for s in BAPPS_SPLITS:
    _log.info(f"{s} 2AFC: " + ", ".join(
        f"{k} {v:.4f}" for k, v in result[s]["per_family"].items())
        + f"; mean {result[s]['mean']:.4f} (uncalibrated {result[s]['uncalibrated']['mean']:.4f})")
  _log.info("weights: %s (config.loss.weights=%s)", p['weights'], p['out'])
  return result
