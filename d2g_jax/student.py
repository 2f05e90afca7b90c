"""A trained one-step generator (the student), the twin of `teacher.py`.

Legend: B batch, H/W/C latent height/width/channels.

Two places hold a student:
  - a training run's checkpoints folder (`train.checkpoint_dir`): only the generator's weights
    of one step are read (`load_checkpoint`; the EMA by default), and the teacher folder gives
    the UNet config, the schedule, the text encoders and the VAE; a training workdir's
    `run_config.json` (`workdir_config`) names both, and the generator's settings;
  - an exported diffusers pipeline folder (`export` stage): its UNet once at the one-step
    scheduler's timestep, read as x0 per its `prediction_type` (`load_folder`).

    generator, params, step = load_checkpoint(config, config.train.checkpoint_dir)
    x0_BxHxWxC = generator.apply(params, z_BxHxWxC, cond)

Export, evaluation and the demo's report sample the student through here.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from d2g_jax.files import load_json
from d2g_jax.infra import run_config
from d2g_jax.infra.checkpoint import Checkpointer
from d2g_jax.models.generator import Generator
from d2g_jax.models.unet import UNet, init_shapes
from d2g_jax.teacher import Teacher, load_teacher

# export.weights / which generator a checkpoint gives: its key in the train state
WEIGHTS = {"ema": "g_ema", "generator": "g_params"}


def generator_for(config, teacher: Teacher | None = None) -> Generator:
  """The generator the config trains: the teacher folder's UNet at `generator.timestep`,
  read per `generator.parameterization` (the UNet config and schedule come from the folder)."""
  teacher = teacher or load_teacher(config.teacher.path, components=())
  return Generator(UNet(teacher.info.unet), teacher.schedule, config.generator.timestep,
                   config.generator.parameterization)


def latest_step(checkpoints: str) -> int | None:
  """The newest complete checkpoint's step in `checkpoints`, or None."""
  with Checkpointer(checkpoints, max_to_keep=None) as ckpt:
    return ckpt.latest_step()


def load_checkpoint(config, checkpoints: str, weights: str = "ema",
                    step: int | None = None) -> tuple[Generator, Any, int]:
  """(Generator, params on the host, step) from a training run's checkpoints folder: only
  the generator's weights (`weights`: ema | generator) of `step` (default: the latest) are
  read; the teacher folder (`config.teacher.path`) gives the UNet config and schedule."""
  if weights not in WEIGHTS:
    raise ValueError(f"weights={weights!r}; expected one of {sorted(WEIGHTS)}")
  teacher = load_teacher(config.teacher.path, components=())
  gen = generator_for(config, teacher)
  with Checkpointer(checkpoints, max_to_keep=None) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}: run the train stage "
                              "first (--config.stages=train)")
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu),
                            init_shapes(teacher.info.unet))
    key = WEIGHTS[weights]
    params = jax.device_get(ckpt.restore_partial(step, {key: abstract})[key])
  return gen, params, step


def workdir_config(workdir: str):
  """The config a training workdir was trained with (<workdir>/run_config.json, written by the
  train stage with every path resolved), as a ConfigDict: `teacher.path`, the `generator`
  block and `train.checkpoint_dir` say how to load its student (`load_checkpoint`)."""
  import ml_collections
  path = run_config.path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a training workdir (the "
                            "train stage writes run_config.json there); give the workdir of a "
                            "run, or an exported pipeline folder (--config.stages=export)")
  config = ml_collections.ConfigDict(load_json(path, "run config"))
  missing = [k for k in ("teacher", "generator", "train") if k not in config]
  if missing:
    raise ValueError(f"{path} has no {', '.join(missing)} block(s): not a Diffusion2GAN "
                     "training run's config")
  return config


def one_step_generator(folder: Teacher) -> Generator:
  """The generator of an exported pipeline folder (loaded as a `Teacher`): its UNet at the
  one-step scheduler's single timestep. A folder whose scheduler is not one step at the last
  training timestep (a teacher) is refused, naming the file."""
  schedule = folder.schedule
  where = f"{folder.info.path}/scheduler/scheduler_config.json"
  timestep = int(schedule.timesteps(1)[0])
  if timestep != schedule.num_train_timesteps - 1 or not schedule.set_alpha_to_one:
    raise ValueError(
        f"{where} is not a one-step scheduler as export_pipeline writes (one step at the last "
        f"training timestep, set_alpha_to_one=True); it gives timestep {timestep} of "
        f"{schedule.num_train_timesteps}, set_alpha_to_one={schedule.set_alpha_to_one}. For a "
        "teacher folder sample with DDIM instead (eval source 'ddim').")
  return Generator(folder.unet, schedule, timestep, schedule.prediction_type)
