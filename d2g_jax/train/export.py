"""The `export` stage: the trained generator as a diffusers pipeline folder (+ an Orbax copy).

    python -m d2g_jax.main --config configs/sd15.py --config.stages=export

Reads only the generator's weights (`export.weights`: the EMA by default) from the latest
checkpoint in `train.checkpoint_dir` (`d2g_jax.student`), and writes `export.out_dir`: the student UNet, the
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

from d2g_jax import dtypes, student
from d2g_jax.convert import orbax_io
from d2g_jax.convert.pipeline import export_pipeline
from d2g_jax.files import load_json, save_json
from d2g_jax.log import get_logger
from d2g_jax.teacher import load_teacher

_log = get_logger(__name__)
INFO = "d2g_export.json"


def run_export(config) -> dict:
  """The export stage. Returns the export record (also written as out_dir/d2g_export.json)."""
  e = config.export
  if e.weights not in student.WEIGHTS:
    raise ValueError(f"export.weights={e.weights!r}; expected one of {sorted(student.WEIGHTS)}")
  dtype = dtypes.get(e.dtype, "export.dtype", dtypes.STORAGE).type
  checkpoints = config.train.checkpoint_dir
  step = student.latest_step(checkpoints)
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {checkpoints}: run the train "
                            "stage first (--config.stages=train,export)")
  teacher = load_teacher(config.teacher.path, components=())
  gen = student.generator_for(config, teacher)
  record = {"step": step, "checkpoint_dir": checkpoints, "weights": e.weights,
            "dtype": e.dtype, "timestep": gen.timestep, "prediction_type": gen.prediction_type,
            "teacher": os.path.abspath(config.teacher.path)}
  info_path = os.path.join(e.out_dir, INFO)
  if os.path.isfile(info_path) and load_json(info_path, "export record") == record \
      and os.path.isdir(e.orbax_dir):
    _log.info("%s already holds step %d (%s weights); nothing to do", e.out_dir, step, e.weights)
    return record
  # Every host reads the generator; process 0 writes the diffusers folder and the record, and
  # the Orbax copy is saved by all together (Orbax's saves are collective; host arrays are
  # written by process 0).
  gen, params, _ = student.load_checkpoint(config, checkpoints, e.weights, step)
  if jax.process_index() == 0:
    export_pipeline(config.teacher.path, gen.unet, params, e.out_dir, timestep=gen.timestep,
                    prediction_type=gen.prediction_type, dtype=dtype, overwrite=True)
  cast = jax.tree.map(lambda x: np.asarray(x, dtype), params)
  orbax_io.save(e.orbax_dir, cast, "unet", teacher.info.unet.to_diffusers(), overwrite=True)
  if jax.process_index() == 0:
    save_json(record, info_path)  # last: the record says the folder is whole
  _log.info("step %d (%s weights, %s) -> %s (diffusers, 1-step DDIM at t=%d, %s) and "
           "%s (Orbax)", step, e.weights, e.dtype, e.out_dir, gen.timestep, gen.prediction_type,
           e.orbax_dir)
  return record
