"""The `latent_vgg_train` stage: E-LatentLPIPS's latent VGG16-BN trunk, trained to classify
cached VAE latents (ImageNet in the real config), data-parallel over the mesh, exact resume.

Legend: B global batch, b this host's rows, h/w/L latent height/width/channels, K classes.

    python -m d2g_jax.main --config configs/latent_vgg_imagenet.py \
        --config.stages=latent_cache,latent_vgg_train ...

Resume order, every start: 1. the run's config is checked against
<out>/classifier/run_config.json (a different one is refused, listing the keys); 2. model,
optimiser and the grain pipeline are built from it; 3. the latest complete checkpoint
(state and the iterator's position) is restored, else the state starts from the seed;
4. the loop continues: step s draws its randomness (augmentation, dropout) from
fold_in(key(seed), s), so a resumed run is the uninterrupted one, bit for bit. A finished
run (classify_results.json of this config) is not trained again.

Outputs: <out>/trunk/{encoder}_elatentlpips.safetensors (the trained trunk with batch-norm
statistics folded in, heads uncalibrated: what latent_vgg_calibrate calibrates, and a
LatentLPIPS that `load_latent_lpips` reads), <out>/ckpt/{encoder}_latent_vgg16.pth.tar (the
official classifier file; VGG16 widths and torch only), <out>/classify_results.json (held-out
top-1 / top-5 and the run's numbers). Metrics go to TensorBoard under <out>/classifier/tb.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2g_jax import distributed, dtypes, files, lock, parallel
from d2g_jax.data import source
from d2g_jax.data.latent_cache import paths
from d2g_jax.data.writer import sha256_json
from d2g_jax.infra import checkpoint, metrics, run_config
from d2g_jax.log import get_logger
from d2g_jax.losses import augment as augment_lib
from d2g_jax.models.latent_vgg import ENCODERS, LPIPS, LPIPSConfig, VGGConfig, merge_batch_stats
from d2g_jax.models.latent_vgg_classifier import HEADS, LatentVGGClassifier

_log = get_logger(__name__)

RESULTS = "classify_results.json"
# Keys a restart may change: how long it trains (the lr schedule is in absolute epochs), how
# often things are logged, evaluated and kept.
RESTART_IGNORE = ("train.num_steps", "train.epochs", "train.log_every", "train.eval_every",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.eval_batch_size")
READ = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


# ------------------------------------------------------------------ building
def make_model(lv, num_classes: int) -> LatentVGGClassifier:
  t = lv.train
  if lv.encoder not in ENCODERS:
    raise ValueError(f"config.latent_vgg.encoder={lv.encoder!r}; expected one of "
                     f"{sorted(ENCODERS)} (the latent family the weights are for)")
  if t.head not in HEADS:
    raise ValueError(f"config.latent_vgg.train.head={t.head!r}; expected one of {HEADS}")
  dtype = dtypes.get(t.dtype, "config.latent_vgg.train.dtype")
  vgg = VGGConfig.latent(ENCODERS[lv.encoder][0], tuple(lv.widths))
  return LatentVGGClassifier(vgg, num_classes, head=t.head, hidden=t.hidden, dropout=t.dropout,
                             dtype=dtype, bn_momentum=t.bn_momentum)


def lr_schedule(t, steps_per_epoch: int) -> optax.Schedule:
  """lr x linear warm-up x lr_decay at each of lr_decay_epochs."""
  decay = optax.piecewise_constant_schedule(
      t.lr, {int(e * steps_per_epoch): t.lr_decay for e in t.lr_decay_epochs})
  if t.warmup_steps <= 0:
    return decay
  return lambda step: decay(step) * jnp.minimum(1.0, (step + 1) / t.warmup_steps)


def make_optimizer(t, steps_per_epoch: int) -> tuple[optax.GradientTransformation, Any]:
  """SGD with momentum (torchvision's ImageNet recipe) or AdamW; weight decay on every param."""
  schedule = lr_schedule(t, steps_per_epoch)
  if t.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(t.weight_decay),
                     optax.sgd(schedule, momentum=t.momentum))
  elif t.optimizer == "adamw":
    tx = optax.adamw(schedule, b1=t.momentum, weight_decay=t.weight_decay)
  else:
    raise ValueError(f"config.latent_vgg.train.optimizer={t.optimizer!r}; expected sgd or adamw")
  return tx, schedule


def init_state(model: LatentVGGClassifier, tx, latent_shape, seed: int, mesh) -> dict:
  """{step, params, batch_stats, opt_state}, replicated over the mesh."""
  def init():
    x = jnp.zeros((1, *latent_shape), jnp.float32)
    rng = jax.random.key(seed)
    variables = model.init({"params": rng, "dropout": rng}, x, train=True)
    params = variables["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "batch_stats": variables["batch_stats"], "opt_state": tx.init(params)}
  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


# ------------------------------------------------------------------ steps
def train_step(model: LatentVGGClassifier, tx, policy: str, augment_p: float, seed: int,
               schedule, state: dict, batch: dict) -> tuple[dict, dict]:
  """One SGD step on a global batch {"latent": BxhxwxL, "label": B}; pure."""
  key = jax.random.fold_in(jax.random.key(seed), state["step"])
  x = batch["latent"].astype(jnp.float32)
  if policy:
    x = augment_lib.augment(jax.random.fold_in(key, 0), x, policy, augment_p)
  labels = batch["label"].astype(jnp.int32)

  def loss_fn(params):
    logits, updated = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x,
                                  train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.fold_in(key, 1)})
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return loss, (logits, updated["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
         "batch_stats": batch_stats, "opt_state": opt_state}
  out = {"loss": loss, "top1": jnp.mean(jnp.argmax(logits, -1) == labels),
         "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
  return new, out


def eval_params(state: dict) -> dict:
  """Params for `train=False`: the trunk's batch-norm running statistics folded in."""
  params = dict(state["params"])
  params["net"] = merge_batch_stats(params["net"], state["batch_stats"]["net"])
  return params


def eval_step(model: LatentVGGClassifier, params: dict, batch: dict) -> dict:
  """Correct top-1 / top-k counts over the real (weight 1) rows of a padded batch."""
  logits = model.apply({"params": params}, batch["latent"].astype(jnp.float32), train=False)
  labels, weight = batch["label"].astype(jnp.int32), batch["weight"]
  k = min(5, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  return {"top1": jnp.sum(weight * (topk[:, 0] == labels)),
          f"top{k}": jnp.sum(weight * jnp.any(topk == labels[:, None], axis=-1)),
          "count": jnp.sum(weight)}


def evaluate(eval_fn, params, data: source.ShardSource, batch_size: int, mesh) -> dict:
  """Held-out accuracy over every example of `data` (this host reads its rows of each batch)."""
  b = parallel.local_batch_size(batch_size, mesh)
  lo_host = jax.process_index() * b
  total: dict[str, float] = {}
  shape = data[0]["latent"].shape
  for start in range(0, len(data), batch_size):
    rows = [i for i in range(start + lo_host, start + lo_host + b) if i < len(data)]
    recs = data.__getitems__(rows) if rows else []
    lat = np.zeros((b, *shape), np.float32)
    label, weight = np.zeros((b,), np.int32), np.zeros((b,), np.float32)
    for r, rec in enumerate(recs):
      lat[r], label[r], weight[r] = rec["latent"], rec["label"], 1.0
    out = jax.device_get(eval_fn(params, parallel.host_to_global(
        {"latent": lat, "label": label, "weight": weight}, mesh)))
    for k, v in out.items():
      total[k] = total.get(k, 0.0) + float(v)
  count = total.pop("count")
  return {k: v / count for k, v in total.items()}


# ------------------------------------------------------------------ the stage
def _caches(p: dict) -> tuple[source.ShardSource, source.ShardSource, list[str]]:
  try:
    train, held_out = source.ShardSource(p["train"]), source.ShardSource(p["eval"])
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}. Run the latent_cache stage first (with "
                            "config.latent_vgg.cache.train and .eval set).") from e
  for name, src in (("train", train), ("eval", held_out)):
    if "label" not in src.manifest["record"]:
      raise ValueError(f"the {name} cache {src.folder} holds {sorted(src.manifest['record'])}, "
                       "no class labels; classification needs labelled images")
  classes = train.manifest["config"]["class_names"]
  if held_out.manifest["config"]["class_names"] != classes:
    raise ValueError(f"the train ({p['train']}) and eval ({p['eval']}) caches have different "
                     "class lists; encode both splits of the same dataset")
  return train, held_out, classes


def _run_config(config, train, held_out) -> dict:
  lv = config.latent_vgg
  return {"seed": config.seed, "encoder": lv.encoder, "widths": list(lv.widths),
          "train": lv.train.to_dict(), "caches": {"train": train.manifest["config_sha256"],
                                                  "eval": held_out.manifest["config_sha256"]}}


def _write_outputs(config, model, state, p, result) -> dict:
  lv = config.latent_vgg
  params = eval_params(state)
  lpips = LPIPS(LPIPSConfig.latent(lv.encoder, widths=tuple(lv.widths)))
  heads = {f"lin{k}": {"model_1": {"kernel": np.ones((1, 1, w, 1), np.float32)}}
           for k, w in enumerate(lv.widths)}
  from d2g_jax.convert import lpips as convert_lpips
  trunk = os.path.join(p["trunk"], f"{lv.encoder}_elatentlpips.safetensors")
  convert_lpips.save_lpips(lpips, {"net": jax.device_get(params["net"]), **heads}, trunk)
  outputs = {"trunk": trunk}
  try:
    outputs["official_classifier"] = convert_lpips.export_classifier(
        model, jax.device_get(params), p["official"], lv.encoder, best_acc1=100 * result["top1"],
        epoch=result["epochs"], num_batches_tracked=result["num_steps"])
  except convert_lpips.ConversionError as e:  # narrow trunk, or no torch
    _log.warning("no official classifier file: %s", e)
  return outputs


def run_train(config) -> dict:
  """Trains the classifier on <out>/cache/{train,eval}; returns the results dict."""
  lv, t = config.latent_vgg, config.latent_vgg.train
  p = paths(config)
  train, held_out, classes = _caches(p)
  rc = _run_config(config, train, held_out)
  results_path = os.path.join(p["out"], RESULTS)
  if os.path.isfile(results_path):
    done = files.load_json(results_path, "classification results")
    if done.get("run_config_sha256") == sha256_json(rc):
      _log.info("already trained: top-1 %.4f (%s)", done['top1'], results_path)
      return done
  mesh = parallel.make_mesh()
  b = parallel.local_batch_size(t.batch_size, mesh)
  steps_per_epoch = len(train) // t.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.latent_vgg.train.batch_size={t.batch_size} exceeds the "
                     f"{len(train)} cached training latents")
  num_steps = t.num_steps if t.num_steps > 0 else t.epochs * steps_per_epoch
  latent_shape = tuple(train[0]["latent"].shape)
  model = make_model(lv, len(classes))
  tx, schedule = make_optimizer(t, steps_per_epoch)
  if t.augment:
    augment_lib.check_policy(t.augment)
  _log.info("%s train / %s held-out latents %s, %s classes; %s steps of batch %s (%.2f epochs) on "
            "%s devices",
            len(train), len(held_out), latent_shape, len(classes), num_steps, t.batch_size,
            num_steps / steps_per_epoch, mesh.size)

  step_fn = jax.jit(functools.partial(train_step, model, tx, t.augment, t.augment_p,
                                      config.seed, schedule), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model))
  ds = source.shard_dataset(p["train"], batch_size=b, seed=config.seed)
  it = iter(ds.map(lambda r: {"latent": r["latent"], "label": r["label"]})
            .to_iter_dataset(READ))
  os.makedirs(p["classifier"], exist_ok=True)
  run_config.ensure(p["classifier"], rc, ignore=RESTART_IGNORE,
                    process_index=jax.process_index())
  start_time, result = time.time(), {}
  with lock.FolderLock(p["classifier"], process_index=jax.process_index()), \
      checkpoint.Checkpointer(os.path.join(p["classifier"], "checkpoints"),
                              max_to_keep=t.keep_checkpoints) as ckpt, \
      metrics.MetricWriter(os.path.join(p["classifier"], "tb")) as writer:
    state = init_state(model, tx, latent_shape, config.seed, mesh)
    if (latest := ckpt.latest_step()) is not None:
      state = ckpt.restore(latest, checkpoint.abstract_like(state), data_iterator=it)
      _log.info("resumed from step %s", latest)
    first = int(state["step"])

    def log_metrics(step, values):
      values = metrics.to_floats(step, values)
      writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
      _log.info("step %d/%d: %s", step, num_steps,
                  ", ".join(f"{k} {v:.4g}" for k, v in sorted(values.items())))

    pending = None  # step s's metrics are fetched after step s + 1 is dispatched
    for step in range(first + 1, num_steps + 1):
      batch = parallel.host_to_global(next(it), mesh)
      if step == first + 1:
        distributed.compile_then_wait(step_fn, state, batch, name="latent_vgg_train step")
      state, out = step_fn(state, batch)
      if pending is not None:
        log_metrics(*pending)
        pending = None
      if step % t.log_every == 0:
        pending = (step, out)
      if step % t.checkpoint_every == 0 or step == num_steps:
        if pending is not None:  # a non-finite loss stops the run before its state is kept
          log_metrics(*pending)
          pending = None
        else:
          metrics.to_floats(step, out)
        ckpt.save(step, state, data_iterator=it)
      if step % t.eval_every == 0 or step == num_steps:
        result = evaluate(eval_fn, eval_params(state), held_out, t.eval_batch_size, mesh)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
        _log.info(f"step {step}: held-out " + ", ".join(
            f"{k} {v:.4f}" for k, v in sorted(result.items())))
    if not result:  # restored at the last step: evaluate the final state
      result = evaluate(eval_fn, eval_params(state), held_out, t.eval_batch_size, mesh)
    ckpt.wait()
  seconds = time.time() - start_time
  result = {**result, "num_steps": num_steps, "epochs": num_steps / steps_per_epoch,
            "num_train": len(train), "num_eval": len(held_out), "num_classes": len(classes),
            "seconds_this_run": seconds, "steps_this_run": num_steps - first,
            "run_config_sha256": sha256_json(rc)}
  if jax.process_index() == 0:
    result["outputs"] = _write_outputs(config, model, state, p, result)
    files.save_json(result, results_path)
  _log.info("done: held-out top-1 %.4f; %s", result['top1'], results_path)
  return result
