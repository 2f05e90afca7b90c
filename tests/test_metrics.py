"""MetricWriter: event files TensorBoard reads back, written on process 0 only; to_floats
stops on a non-finite metric, naming the step and the metric."""

import io
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from d2g_jax.infra import metrics


def read_events(logdir):
  acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
  acc.Reload()
  return acc


def test_writes_readable_event_files(tmp_path):
  grid_HxWx3 = np.linspace(0, 1, 6 * 10 * 3, dtype=np.float32).reshape(6, 10, 3)
  with metrics.MetricWriter(str(tmp_path), process_index=0) as writer:
    for step in (0, 10, 20):
      writer.write_scalars(step, metrics.to_floats(step, {"loss/g": jnp.float32(step / 10),
                                                          "lr": jnp.float32(1e-4)}))
    writer.write_images(20, {"samples": grid_HxWx3, "gray": np.zeros((4, 5), np.uint8)})
    writer.write_text(0, {"config": "train.lr: 0.0001"})
  acc = read_events(tmp_path)
  assert [(e.step, e.value) for e in acc.Scalars("loss/g")] == [(0, 0.0), (10, 1.0), (20, 2.0)]
  assert acc.Scalars("lr")[0].value == pytest.approx(1e-4)
  (image,) = acc.Images("samples")
  assert (image.step, image.width, image.height) == (20, 10, 6)
  decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
  np.testing.assert_array_equal(decoded, np.round(grid_HxWx3 * 255).astype(np.uint8))
  assert acc.Images("gray")[0].width == 5
  assert b"train.lr" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0]


def test_other_processes_write_nothing(tmp_path):
  with metrics.MetricWriter(str(tmp_path / "tb"), process_index=3) as writer:
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"x": np.zeros((2, 2, 3))})
  assert not os.path.exists(tmp_path / "tb")


def test_torch_not_imported(tmp_path):
  """tensorboardX would import PyTorch (seconds, memory); the writer keeps it out."""
  code = ("import sys; from d2g_jax.infra import metrics; "
          f"metrics.MetricWriter({str(tmp_path)!r}, process_index=0).close(); "
          "assert 'torch' not in sys.modules, 'torch imported or left blocked'")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                 env={**os.environ, "PYTHONPATH": root})


def test_non_finite_names_step_and_metric():
  assert metrics.to_floats(3, {"a": jnp.float32(1.5), "b": np.int32(2)}) == {"a": 1.5, "b": 2.0}
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    with pytest.raises(metrics.NonFiniteError, match=r"step 41: metric 'loss/d_r1' is") as err:
      metrics.to_floats(41, {"loss/g": jnp.float32(0.3), "loss/d_r1": jnp.float32(bad)})
    assert (err.value.step, err.value.name) == (41, "loss/d_r1")
  with pytest.raises(ValueError, match=r"metric 'v' has shape \(2,\)"):
    metrics.to_floats(0, {"v": jnp.ones(2)})


def test_bad_image(tmp_path):
  with metrics.MetricWriter(str(tmp_path), process_index=0) as writer:
    with pytest.raises(ValueError, match=r"image 'x' has shape \(3,\); expected HxWxC"):
      writer.write_images(0, {"x": np.zeros(3)})
