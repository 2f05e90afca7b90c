"""The `export` stage: the trained generator as a diffusers pipeline folder (+ an Orbax copy).

    python -m d2g_jax.main --config configs/sd15.py --config.stages=export

Reads only the generator's weights (`export.weights`: the EMA by default) from the latest
checkpoint in <workdir>/checkpoints, and writes `export.out_dir`: the student UNet, the
teacher's other components, and a one-step DDIM scheduler whose single timestep is the
generator's, so that

    pipe = StableDiffusionPipeline.from_pretrained(out_dir)      # or ...XLPipeline
    pipe(prompt, num_inference_steps=1, guidance_scale=1.0)

is our G(z, c). `export.orbax_dir` gets the same params with the UNet config (Orbax).
Rerunning with the same checkpoint and options does nothing; a newer checkpoint is
exported over the old folder.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from d2g_jax.convert import orbax_io
from d2g_jax.convert.pipeline import export_pipeline
from d2g_jax.files import load_json, save_json
from d2g_jax.log import get_logger
from d2g_jax.models.generator import Generator
from d2g_jax.models.unet import UNet, init_shapes
from d2g_jax.teacher import load_teacher
from d2g_jax.train.checkpoint import Checkpointer
from d2g_jax.train.loop import checkpoint_dir

log = get_logger("d2g_jax.export")
INFO = "d2g_export.json"
WEIGHTS = {"ema": "g_ema", "generator": "g_params"}
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None}


def load_generator(config, checkpoints: str, weights: str = "ema", step: int | None = None):
  """(Generator, params on the host, step) from a training run's checkpoints folder: only
  the generator's weights (`weights`: ema | generator) of `step` (default: the latest) are
  read; the teacher folder (`config.teacher.path`) gives the UNet config and schedule."""
  if weights not in WEIGHTS:
    raise ValueError(f"weights={weights!r}; expected one of {sorted(WEIGHTS)}")
  teacher = load_teacher(config.teacher.path, components=())
  gen = Generator(UNet(teacher.info.unet), teacher.schedule, config.generator.timestep,
                  config.generator.parameterization)
  with Checkpointer(checkpoints, max_to_keep=None) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}: run the train stage "
                              "first (--config.stages=train)")
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu),
                            init_shapes(teacher.info.unet))
    key = WEIGHTS[weights]
    params = jax.device_get(ckpt.restore_partial(step, {key: abstract})[key])
  return gen, params, step


def run_export(config) -> dict:
  """The export stage. Returns the export record (also written as out_dir/d2g_export.json)."""
  e = config.export
  if e.weights not in WEIGHTS:
    raise ValueError(f"export.weights={e.weights!r}; expected one of {sorted(WEIGHTS)}")
  if e.dtype not in DTYPES:
    raise ValueError(f"export.dtype={e.dtype!r}; expected one of {sorted(DTYPES)}")
  with Checkpointer(checkpoint_dir(config), max_to_keep=None) as ckpt:
    step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(config)}: run the train "
                            "stage first (--config.stages=train,export)")
  teacher = load_teacher(config.teacher.path, components=())
  gen = Generator(UNet(teacher.info.unet), teacher.schedule, config.generator.timestep,
                  config.generator.parameterization)
  record = {"step": step, "checkpoint_dir": checkpoint_dir(config), "weights": e.weights,
            "dtype": e.dtype, "timestep": gen.timestep, "prediction_type": gen.prediction_type,
            "teacher": os.path.abspath(config.teacher.path)}
  info_path = os.path.join(e.out_dir, INFO)
  if os.path.isfile(info_path) and load_json(info_path, "export record") == record \
      and os.path.isdir(e.orbax_dir):
    log.info("%s already holds step %d (%s weights); nothing to do", e.out_dir, step, e.weights)
    return record
  gen, params, _ = load_generator(config, checkpoint_dir(config), e.weights, step)
  if jax.process_index() != 0:
    return record
  dtype = DTYPES[e.dtype]
  if e.dtype == "bfloat16":
    import ml_dtypes
    dtype = ml_dtypes.bfloat16
  export_pipeline(config.teacher.path, gen.unet, params, e.out_dir, timestep=gen.timestep,
                  prediction_type=gen.prediction_type, dtype=dtype, overwrite=True)
  cast = jax.tree.map(lambda x: np.asarray(x, dtype), params)
  orbax_io.save(e.orbax_dir, cast, "unet", teacher.info.unet.to_diffusers(), overwrite=True)
  save_json(record, info_path)
  log.info("step %d (%s weights, %s) -> %s (diffusers, 1-step DDIM at t=%d, %s) and "
           "%s (Orbax)", step, e.weights, e.dtype, e.out_dir, gen.timestep, gen.prediction_type,
           e.orbax_dir)
  return record
