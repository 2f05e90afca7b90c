"""Preflight: every input of the requested stages checked before any of them starts.

    preflight.check(config, ["pairs", "train", "export"])  # raises PreflightError, or None

`run.run` calls it after `resolve` (paths substituted) and before it takes the workdir lock,
so a run that cannot finish says so in seconds, with all of its problems at once, instead of
failing hours in. It reads configs and file-system metadata only: no weights, no datasets.
Stage by stage (`stages.CHECKS`; the kinds of input in `inputs.Inputs`) it looks at:
  - the teacher folder and the components the stage loads (`inspect_pipeline`: model_index.json
    and every component config; the weight files present, not read);
  - prompt sources (a file exists, a tfds spec parses), image sources, BAPPS folders, the
    datasets and checkpoints an earlier stage wrote;
  - loss networks: E-LatentLPIPS / pixel LPIPS weights present (random ones only with
    loss.allow_random_weights / eval.allow_random_lpips), their latent channels vs the VAE's;
    the eval networks (Inception, CLIP) and FID references;
  - outputs: the nearest existing folder of each is writable;
  - batch sizes against the devices, and the training mesh and microbatches (`check_batch`).

An input that an earlier stage of the same command writes (`outputs`: `train` reads the
`pairs.out_dir` of a `pairs` stage before it; the demo's `digits_teacher` writes
`teacher.path`) need not exist yet. Each problem names its config key, what was found and
what a valid value looks like.
"""

from __future__ import annotations

import os

from d2g_jax.convert import lpips as convert_lpips
from d2g_jax.data import latent_cache
from d2g_jax.preflight.inputs import Inputs, Problem
from d2g_jax.preflight.stages import CHECKS

__all__ = ["PreflightError", "Problem", "check", "outputs"]


class PreflightError(ValueError):
  """The inputs of a run have problems; `problems` lists every one."""

  def __init__(self, problems: list[Problem], stages: list[str]):
    self.problems = tuple(problems)
    lines = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"{len(self.problems)} problem(s) with the inputs of stage(s) "
                     f"{', '.join(stages)}; nothing was started:\n{lines}")


def check(config, names: list[str]) -> None:
  """Raises PreflightError listing every problem of the inputs of stages `names` (in order)."""
  x = Inputs(config)
  x.writable("workdir", config.workdir)
  for name in names:
    CHECKS.get(name, lambda x: None)(x)
    x.made += outputs(config, name)
  problems = list({str(p): p for p in x.problems}.values())  # each once, in order
  if problems:
    raise PreflightError(problems, names)


def outputs(config, name: str) -> list[str]:
  """The files and folders stage `name` writes that a later stage may read."""
  c, p = config, latent_cache.paths(config)
  cache = c.latent_vgg.cache
  caches = [(p["train"], cache.train), (p["eval"], cache.eval), (p["bapps_train"], cache.bapps),
            (p["bapps_val"], cache.bapps)]
  official = lambda f: os.path.join(p["official"], f.format(encoder=c.latent_vgg.encoder))
  return {
      "tiny_teacher": [c.teacher.path], "digits_teacher": [c.teacher.path],
      "digits_vae": [os.path.join(c.digits.dir, "vae")],
      "digits_lpips_data": [os.path.join(c.digits.dir, "perceptual_data")],
      "latent_cache": [folder for folder, spec in caches if spec],
      "latent_vgg_train": [p["trunk"], p["classifier"], official(convert_lpips.TRUNK_FILE)],
      "latent_vgg_calibrate": [p["weights"], p["calibrate"], official(convert_lpips.TUNED_FILE)],
      "pairs": [c.pairs.out_dir], "real_latents": [c.real.out_dir],
      "train": [c.train.checkpoint_dir], "export": [c.export.out_dir, c.export.orbax_dir],
      "eval": [c.eval.out_dir],
  }.get(name, [])
