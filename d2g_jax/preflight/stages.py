"""What each stage reads (`CHECKS`: stage name -> its check), in terms of `inputs.Inputs`."""

from __future__ import annotations

import os
from typing import Callable

from d2g_jax.data import latent_cache
from d2g_jax.data import shards as fmt
from d2g_jax.data.bapps import split_folder
from d2g_jax.preflight.inputs import BAPPS, IMAGES, Inputs


def _pairs(x: Inputs):
  c = x.config
  info = x.teacher("teacher.path", c.teacher.path, ("unet", "text"))
  x.prompts("pairs.prompts", c.pairs.prompts, "pairs.tfds_data_dir")
  x.batch("pairs.batch_size", c.pairs.batch_size)
  f = info.vae.downscale if info else 1
  for key in ("pairs.height", "pairs.width"):
    if x.config_value(key) % f:
      x.add(key, f"not a multiple of the VAE's downscale factor {f}", f"0 (the teacher's "
            f"default) or a multiple of {f}")
  x.writable("pairs.out_dir", c.pairs.out_dir)


def _train(x: Inputs):
  from d2g_jax.train.build import check_recipe
  c = x.config
  try:
    check_recipe(c)
  except ValueError as e:
    x.add("train.recipe", str(e))
  gdd = c.train.recipe == "gdd"
  if gdd:
    x.dataset("real.out_dir", c.real.out_dir, "real_latents")
  else:
    x.dataset("train.pairs", c.train.pairs, "pairs")
  info = x.teacher("teacher.path", c.teacher.path, ("unet", "vae") + (("text",) if gdd else ()))
  if c.objective.regression_weight:
    x.loss(info)
  x.train_mesh()
  x.writable("train.checkpoint_dir", c.train.checkpoint_dir)


def _checkpoints(x: Inputs, key: str, folder: str):
  x.folder(key, folder, "the train stage's checkpoints folder: run it first "
           "(--config.stages=train,...) or point the key at an existing run's")


def _export(x: Inputs):
  c = x.config
  _checkpoints(x, "train.checkpoint_dir", c.train.checkpoint_dir)
  x.teacher("teacher.path", c.teacher.path)
  x.writable("export.out_dir", c.export.out_dir)
  x.writable("export.orbax_dir", c.export.orbax_dir)


def _eval(x: Inputs):
  from d2g_jax.evaluate import fidelity, samplers
  from d2g_jax.evaluate import stage as eval_stage
  c, e = x.config, x.config.eval
  try:
    names = eval_stage.rows(c)
  except ValueError as err:
    x.add("eval.rows", str(err))
    names = []
  infos = []
  for name in names:
    row, k, parts = e[name], f"eval.{name}", ("unet", "vae", "text")
    if row.source == "ddim":
      path = row.path or c.teacher.path  # by default "{teacher.path}": name the key to set
      key = "teacher.path" if path == c.teacher.path else f"{k}.path"
      infos.append(x.teacher(key, path, parts))
    elif row.source == "one_step":
      if not row.path:
        x.add(f"{k}.path", "empty", "the exported student's pipeline folder (the export stage "
              "writes it to export.out_dir)")
      else:
        infos.append(x.teacher(f"{k}.path", row.path, parts))
    elif row.source == "checkpoint":
      infos.append(x.teacher("teacher.path", c.teacher.path, parts))
      _checkpoints(x, f"{k}.path" if row.path else "train.checkpoint_dir",
                   row.path or c.train.checkpoint_dir)
    else:
      x.add(f"{k}.source", "unknown source", f"one of {', '.join(samplers.SOURCES)}")
  x.prompts("eval.prompts", e.prompts, "eval.tfds_data_dir")
  if e.fid.inception_weights:
    x.file("eval.fid.inception_weights", e.fid.inception_weights,
           "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's weights)")
  if e.fid.ref_stats:
    x.file("eval.fid.ref_stats", e.fid.ref_stats, "an .npz with mu and sigma")
  elif e.fid.ref and not e.fid.ref.startswith("tfds:"):
    x.folder("eval.fid.ref", e.fid.ref, "a folder of real images or tfds:<name>/<split>")
  if e.clip.path:
    x.folder("eval.clip.path", e.clip.path, "a transformers CLIPModel folder")
  if eval_stage.lpips_needed(c, names):
    family = infos[0].family if infos and infos[0] is not None else None
    encoder = e.lpips_encoder or fidelity.LPIPS_ENCODERS.get(family)
    x.lpips_weights("eval.lpips_weights", e.lpips_weights, encoder, "eval.allow_random_lpips")
  x.batch("eval.batch_size", e.batch_size)
  x.writable("eval.out_dir", e.out_dir)


def _latent_cache(x: Inputs):
  lv = x.config.latent_vgg
  cache = lv.cache
  if not (cache.train or cache.eval or cache.bapps):
    x.add("latent_vgg.cache.train", "empty, as are cache.eval and cache.bapps: nothing to encode",
          f"{IMAGES}; and/or cache.bapps: {BAPPS}")
  for key in ("latent_vgg.cache.train", "latent_vgg.cache.eval"):
    if x.config_value(key):
      x.images(key, x.config_value(key), "latent_vgg.cache.tfds_data_dir")
  if cache.bapps and not x.will_exist(cache.bapps):
    for split in latent_cache.BAPPS_SPLITS:
      try:
        split_folder(cache.bapps, split)
      except FileNotFoundError as e:
        x.add("latent_vgg.cache.bapps", str(e))
  x.vae("latent_vgg.vae", lv.vae, lv.encoder, "latent_vgg.encoder")
  x.batch("latent_vgg.cache.batch_size", cache.batch_size)
  x.writable("latent_vgg.out_dir", lv.out_dir)


def _caches(x: Inputs, sources: dict[str, str]):
  """The latent caches (latent_cache.paths names) a stage reads, each made from the source
  its key names: there, or made by a latent_cache stage before."""
  p = latent_cache.paths(x.config)
  for key in dict.fromkeys(sources.values()):
    missing = [p[n] for n, k in sources.items() if k == key and not x.will_exist(p[n])
               and not os.path.isfile(os.path.join(p[n], fmt.MANIFEST))]
    if missing and not x.config_value(key):
      x.add(key, "empty, so there is no latent cache of it for this stage to read",
            (BAPPS if key.endswith("bapps") else IMAGES) + ", encoded by the latent_cache stage")
    elif missing:
      x.add("latent_vgg.out_dir", f"no latent cache in {', '.join(missing)}", "the output of the "
            "latent_cache stage: run it first (--config.stages=latent_cache,...)")


def _latent_vgg_train(x: Inputs):
  t = x.config.latent_vgg.train
  _caches(x, {"train": "latent_vgg.cache.train", "eval": "latent_vgg.cache.eval"})
  x.batch("latent_vgg.train.batch_size", t.batch_size)
  x.batch("latent_vgg.train.eval_batch_size", t.eval_batch_size)
  x.writable("latent_vgg.out_dir", x.config.latent_vgg.out_dir)


def _latent_vgg_calibrate(x: Inputs):
  lv = x.config.latent_vgg
  trunk = lv.calibrate.trunk or latent_cache.paths(x.config)["trunk"]
  if not (x.will_exist(trunk) or os.path.exists(trunk)):
    x.add("latent_vgg.calibrate.trunk", f"{trunk} does not exist", "a trunk to calibrate: run "
          "the latent_vgg_train stage first, or give a trunk file (e.g. an official "
          f"{lv.encoder}_latent_vgg16.pth.tar)")
  _caches(x, {"bapps_train": "latent_vgg.cache.bapps", "bapps_val": "latent_vgg.cache.bapps"})
  x.batch("latent_vgg.calibrate.batch_size", lv.calibrate.batch_size)
  x.batch("latent_vgg.calibrate.feature_batch_size", lv.calibrate.feature_batch_size)
  x.writable("latent_vgg.out_dir", lv.out_dir)


def _real_latents(x: Inputs):
  c, r = x.config, x.config.real
  x.teacher("teacher.path", c.teacher.path, ("vae",))
  x.images("real.images", r.images, "real.tfds_data_dir")
  if r.images.startswith("folder:") and not r.caption_template:
    x.add("real.images", "class folders: gives class labels, not captions", "captioned:<root>, "
          "tfds with real.caption_key, or class folders with real.caption_template (e.g. "
          "'a photo of a {}')")
  x.batch("real.batch_size", r.batch_size)
  x.writable("real.out_dir", r.out_dir)


def _demo_report(x: Inputs):
  c = x.config
  info = x.teacher("teacher.path", c.teacher.path, ("unet", "vae", "text"))
  _checkpoints(x, "train.checkpoint_dir", c.train.checkpoint_dir)
  x.folder("export.out_dir", c.export.out_dir, "the export stage's folder: run it first")
  x.loss(info)


CHECKS: dict[str, Callable[[Inputs], None]] = {
    "tiny_teacher": lambda x: x.writable("teacher.path", x.config.teacher.path),
    "roundtrip": lambda x: x.teacher("teacher.path", x.config.teacher.path, ("unet",)),
    "digits_vae": lambda x: x.writable("digits.dir", x.config.digits.dir),
    "digits_teacher": lambda x: x.writable("teacher.path", x.config.teacher.path),
    "digits_lpips_data": lambda x: x.writable("digits.dir", x.config.digits.dir),
    "pairs": _pairs, "train": _train, "export": _export, "eval": _eval,
    "latent_cache": _latent_cache, "latent_vgg_train": _latent_vgg_train,
    "latent_vgg_calibrate": _latent_vgg_calibrate, "real_latents": _real_latents,
    "demo_report": _demo_report,
}
