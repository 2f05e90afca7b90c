"""Training metrics: TensorBoard event files and metrics.jsonl from process 0, and a
finiteness check.

    with metrics.MetricWriter(os.path.join(workdir, "tensorboard")) as writer:
      values = metrics.to_floats(step, device_metrics)   # NonFiniteError on NaN / inf
      writer.write_scalars(step, values)
      writer.write_images(step, {"samples": grid_HxWx3})  # uint8, or float in [0, 1]

Event files are written with tensorboardX (numpy + protobuf; no TensorFlow); view them
with `tensorboard --logdir <workdir>/tensorboard`. On every process but 0 the writer
does nothing, so the loop can call it unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np


class NonFiniteError(FloatingPointError):
  """A training metric became NaN or infinite."""

  def __init__(self, step: int, name: str, value: float):
    self.step, self.name, self.value = step, name, value
    super().__init__(
        f"step {step}: metric {name!r} is {value} (not finite); training stopped. The last "
        f"complete checkpoint is from before this step; lower the learning rate or check "
        f"the inputs of {name!r}, then restart from it.")


def to_floats(step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
  """Fetches scalar (device) metrics to Python floats; raises NonFiniteError naming the
  first non-finite one (in sorted key order, so every host names the same)."""
  values = jax.device_get(dict(metrics))
  out = {}
  for name in sorted(values):
    v = np.asarray(values[name])
    if v.size != 1:
      raise ValueError(f"metric {name!r} has shape {v.shape}; to_floats takes scalars "
                       f"(reduce it in the step, e.g. jnp.mean)")
    out[name] = float(v.reshape(()))
    if not math.isfinite(out[name]):
      raise NonFiniteError(int(step), name, out[name])
  return out


def _to_uint8_hwc(name: str, image: Any) -> np.ndarray:
  image = np.asarray(jax.device_get(image))
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image {name!r} has shape {image.shape}; expected HxWxC with C in 1, 3, 4")
  if image.dtype != np.uint8:
    image = np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
  return image


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch
  when it can (only to accept torch tensors), which costs seconds and memory in a JAX
  trainer. A None entry in sys.modules makes that import fail; torch stays importable."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """TensorBoard scalars, images and text under `logdir`, written by process 0 only."""

  def __init__(self, logdir: str, *, process_index: int | None = None, flush_secs: int = 30):
    self.logdir = logdir
    self.active = (jax.process_index() if process_index is None else process_index) == 0
    self._writer = None
    if self.active:
      self._writer = _summary_writer_class()(logdir, flush_secs=flush_secs)

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    if self._writer is not None:
      for name, value in scalars.items():
        self._writer.add_scalar(name, float(value), global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]):
    """HxWxC (or HxW) arrays: uint8, or floats in [0, 1] (clipped)."""
    if self._writer is not None:
      for name, image in images.items():
        self._writer.add_image(name, _to_uint8_hwc(name, image), global_step=int(step),
                               dataformats="HWC")

  def write_text(self, step: int, texts: Mapping[str, str]):
    """E.g. the run's config at step 0 (shown in TensorBoard's Text tab)."""
    if self._writer is not None:
      for name, text in texts.items():
        self._writer.add_text(name, text, global_step=int(step))

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


METRICS_FILE = "metrics.jsonl"


class MetricsLog:
  """<workdir>/metrics.jsonl on process 0: one line per logged step; on resume, lines
  after the restored step are dropped (they are about to be recomputed)."""

  def __init__(self, workdir: str, start_step: int):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = jax.process_index() == 0
    if self.enabled and os.path.exists(self.path):
      with open(self.path) as fh:
        keep = [line for line in fh if line.strip() and json.loads(line)["step"] <= start_step]
      with open(self.path, "w") as fh:
        fh.writelines(keep)

  def write(self, step: int, values: dict[str, float]):
    if self.enabled:
      with open(self.path, "a") as fh:
        fh.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")


def read_metrics(workdir: str) -> list[dict]:
  """The lines of <workdir>/metrics.jsonl."""
  with open(os.path.join(workdir, METRICS_FILE)) as fh:
    return [json.loads(line) for line in fh if line.strip()]
