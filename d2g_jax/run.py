"""Stages and their order. Each stage is a function of the whole config, safe to re-run.

Stages (config.stages, comma-separated, run in the order given):
  tiny_teacher  build a tiny random-weight diffusers pipeline at config.teacher.path
                (demo and CI: no model hub here; needs the torch extra)
  roundtrip     teacher UNet: diffusers -> Flax -> Orbax -> diffusers, checked bit-exact,
                and Flax vs diffusers outputs compared on random inputs (needs the torch extra)
  pairs         the teacher's DDIM+CFG solutions as (z, c, x) ArrayRecord shards
  train         Diffusion2GAN distillation: G (one UNet step) vs the multi-scale
                conditional D, E-LatentLPIPS regression; resumable Orbax checkpoints
  export        the trained generator (EMA) as a diffusers pipeline folder + Orbax copy
  eval          the paper's metrics table: FID, CLIP score, fidelity, diversity per row
                (teacher N-step, student one-step), samples resumable like pairs
  latent_cache  images and BAPPS 2AFC triplets -> VAE latents (ArrayRecord shards), for:
  latent_vgg_train      the latent VGG16-BN trunk trained to classify latents (E-LatentLPIPS)
  latent_vgg_calibrate  its LPIPS heads calibrated on BAPPS 2AFC judgments -> the loss weights
  real_latents  captioned real images -> the teacher VAE's latents, the data of the GDD recipe
                (train.recipe=gdd trains on them instead of pairs)
  digits_vae    the digits demo: a tiny AutoencoderKL trained on scikit-learn's 8x8 digits,
                written as a diffusers VAE folder under config.digits.dir
  digits_teacher  a tiny text-conditioned UNet trained on that VAE's latents ("a handwritten
                digit 7", prompt dropped for CFG), written with the VAE and a tiny CLIP text
                encoder and tokenizer as a StableDiffusionPipeline folder at teacher.path
  digits_lpips_data  the digits as class folders + proxy-judged 2AFC triplets for the demo's
                latent VGG (latent_cache, latent_vgg_train, latent_vgg_calibrate then train it)
  demo_report   the digits demo's demo.png and metrics.json (accuracy, diversity, distances)

Before anything starts, `preflight.check` checks every input of the requested stages and
lists all of their problems at once. The whole run then holds a lock on the workdir (and the
pairs stage on its output folder): a second run on the same folder refuses at once, naming
the first.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import ml_collections

from d2g_jax.log import get_logger

_log = get_logger(__name__)

STAGES: dict[str, Callable[[ml_collections.ConfigDict], object]] = {}


def stage(name: str):
  def register(fn):
    STAGES[name] = fn
    return fn
  return register


@stage("tiny_teacher")
def tiny_teacher(config):
  from d2g_jax import tiny
  path = config.teacher.path
  if os.path.isfile(os.path.join(path, "model_index.json")):
    _log.info("%s already exists; keeping it", path)
    return path
  tiny.build(config.teacher.tiny_family, path)
  _log.info("wrote a tiny random %s pipeline to %s", config.teacher.tiny_family, path)
  return path


@stage("digits_vae")
def digits_vae(config):
  from d2g_jax.demo import vae_train
  return vae_train.run_vae(config)


@stage("digits_teacher")
def digits_teacher(config):
  from d2g_jax.demo import teacher_train
  return teacher_train.run_teacher(config)


@stage("roundtrip")
def roundtrip(config):
  from d2g_jax.convert import roundtrip as roundtrip_lib
  return roundtrip_lib.check_unet(os.path.join(config.teacher.path, "unet"),
                                  os.path.join(config.workdir, "roundtrip"))


@stage("pairs")
def pairs(config):
  from d2g_jax.data import teacher_pairs
  with _lock(config, config.pairs.out_dir):
    return teacher_pairs.run_pairs(config)


@stage("train")
def train(config):
  from d2g_jax.train import loop
  return loop.run_train(config)


@stage("export")
def export(config):
  from d2g_jax.train import export as export_lib
  return export_lib.run_export(config)


def _lock(config, folder: str):
  import jax

  from d2g_jax.lock import FolderLock
  os.makedirs(folder, exist_ok=True)
  return FolderLock(folder, process_index=jax.process_index(),
                    stale_after_s=config.train.lock_stale_after_s)


@stage("eval")
def evaluate(config):
  from d2g_jax.evaluate import stage as eval_stage
  return eval_stage.run_eval(config)


@stage("latent_cache")
def latent_cache(config):
  from d2g_jax.data import latent_cache as latent_cache_lib
  return latent_cache_lib.run_latent_cache(config)


@stage("latent_vgg_train")
def latent_vgg_train(config):
  from d2g_jax.latent_lpips import pretrain as latent_vgg
  return latent_vgg.run_train(config)


@stage("latent_vgg_calibrate")
def latent_vgg_calibrate(config):
  from d2g_jax.latent_lpips import calibrate
  return calibrate.run_calibrate(config)


@stage("real_latents")
def real_latents(config):
  from d2g_jax.data import real_latents as real_latents_lib
  with _lock(config, config.real.out_dir):
    return real_latents_lib.run_real_latents(config)


@stage("digits_lpips_data")
def digits_lpips_data(config):
  from d2g_jax.demo import perceptual_data
  return perceptual_data.run_data(config)


@stage("demo_report")
def demo_report(config):
  from d2g_jax.demo import report
  return report.run_report(config)


# Stages of one machine's work (building or training the small demo models, checks, reports):
# in a multi-host run process 0 runs them and the others wait for it.
PROCESS_ZERO = ("tiny_teacher", "roundtrip", "digits_vae", "digits_teacher", "digits_lpips_data",
                "demo_report")


def parse_stages(spec: str) -> list[str]:
  names = [s.strip() for s in spec.split(",") if s.strip()]
  unknown = [n for n in names if n not in STAGES]
  if unknown or not names:
    raise ValueError(f"config.stages={spec!r}: unknown stage(s) {unknown}; "
                     f"available: {', '.join(STAGES)}")
  return names


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A locked copy with the workdir made absolute and every `{key}` reference in string
  values substituted (`config_defaults.substitute`): the paths every stage reads."""
  from d2g_jax import config_defaults
  config = ml_collections.ConfigDict(config.to_dict())
  config.workdir = os.path.abspath(os.path.expanduser(config.workdir))
  config = config_defaults.substitute(config)
  config.lock()  # still locked: a typo'd key fails instead of being added
  return config


def run(config: ml_collections.ConfigDict):
  names = parse_stages(config.stages)
  config = resolve(config)
  if config.distributed.enabled:
    import jax

    from d2g_jax import distributed, log
    distributed.initialize(config.distributed)  # the config, the environment or the cluster
    log.setup(process_index=jax.process_index())  # process 0 logs INFO, the others warnings
    _log.info("process %s of %s, %s local / %s global devices",
              jax.process_index(), jax.process_count(), jax.local_device_count(),
              jax.device_count())
  from d2g_jax import preflight
  preflight.check(config, names)  # every input of every stage, before anything is written
  os.makedirs(config.workdir, exist_ok=True)
  if config.compilation_cache_dir:
    import jax
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  import jax

  from d2g_jax import distributed
  from d2g_jax.infra.preemption import Preempted
  results = {}
  with _lock(config, config.workdir):
    for name in names:
      _log.info("=== stage %s ===", name)
      start = time.time()
      try:
        if name in PROCESS_ZERO and jax.process_index() != 0:
          results[name] = None  # process 0 runs it alone; the others wait at the barrier
        else:
          results[name] = STAGES[name](config)
      except Preempted as stop:  # saved and stopped on SIGTERM: the later stages wait too
        _log.warning("%s; the same command resumes it%s", stop,
                     f" (stages not run: {', '.join(names[names.index(name) + 1:])})"
                     if name != names[-1] else "")
        results[name] = stop.result
        break
      distributed.barrier(f"stage {name}")  # the next stage may read what any host wrote
      _record_seconds(config.workdir, name, time.time() - start)
  return results


def _record_seconds(workdir: str, stage_name: str, seconds: float):
  """<workdir>/stage_seconds.json: the wall time of each stage's latest run (process 0)."""
  import jax

  from d2g_jax.files import load_json, save_json
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "stage_seconds.json")
  times = load_json(path, "stage timings") if os.path.isfile(path) else {}
  times[stage_name] = round(seconds, 2)
  save_json(times, path)
