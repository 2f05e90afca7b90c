"""The project logger: clean format, process 0 only, libraries' INFO chatter filtered
(a real Orbax save through absl) while their warnings and ours still show."""

import io
import logging

import jax.numpy as jnp
import pytest
from absl import logging as absl_logging

from d2g_jax import log
from d2g_jax.infra import checkpoint


@pytest.fixture
def logs():
  """log.setup() onto a StringIO, and every global it touched restored afterwards."""
  root, absl = logging.getLogger(log.ROOT), logging.getLogger("absl")
  targets = [absl, *map(logging.getLogger, log.NOISY_LOGGERS), *logging.getLogger().handlers]
  saved = ([list(t.filters) for t in targets], root.propagate, root.level, dict(log._state),
           absl_logging.get_verbosity())
  stream = io.StringIO()
  capture = logging.StreamHandler(io.StringIO())  # what absl's handler would print
  absl.addHandler(capture)
  absl_logging.set_verbosity(absl_logging.INFO)
  log.setup(process_index=0, stream=stream)
  yield stream, capture.stream
  absl.removeHandler(capture)
  root.removeHandler(log._state["handler"])
  for t, filters in zip(targets, saved[0]):
    t.filters[:] = filters
  root.propagate, root.level = saved[1], saved[2]
  log._state.clear()
  log._state.update(saved[3])
  absl_logging.set_verbosity(saved[4])


def test_format_and_process_zero_only(logs):
  stream, _ = logs
  log.get_logger("d2g_jax.train.loop").info("step %d: loss %.2f", 5, 0.25)
  log.get_logger().info("plain")
  lines = stream.getvalue().splitlines()
  assert lines[0].endswith(" I train.loop: step 5: loss 0.25"), lines
  assert lines[1].endswith(" I plain"), lines
  assert log.get_logger("train").name == "d2g_jax.train"

  log.setup(process_index=3)  # another host: warnings and errors only, marked
  log.get_logger("d2g_jax.data").info("not shown")
  log.get_logger("d2g_jax.data").warning("shown")
  lines = stream.getvalue().splitlines()
  assert "not shown" not in stream.getvalue()
  assert lines[-1].endswith(" W p3 data: shown"), lines


def test_library_info_filtered_warnings_kept(logs, tmp_path):
  _, absl_out = logs
  with checkpoint.Checkpointer(tmp_path) as ckpt:  # Orbax narrates this at INFO
    ckpt.save(1, {"x": jnp.ones(2)})
  absl_logging.info("our own absl info stays")
  logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
  record = logging.LogRecord("absl", logging.WARNING, "/x/site-packages/orbax/checkpoint/a.py",
                             1, "an Orbax warning stays", None, None)
  logging.getLogger("absl").handle(record)
  text = absl_out.getvalue()
  assert "our own absl info stays" in text and "an Orbax warning stays" in text
  assert "orbax" not in text.replace("an Orbax warning stays", "").lower(), text
  assert "tpu" not in text


def test_noise_filter_rules():
  f = log.LibraryNoiseFilter()
  rec = lambda name, level, path: logging.LogRecord(name, level, path, 1, "m", None, None)  # noqa
  assert not f.filter(rec("absl", logging.INFO, "/v/site-packages/orbax/checkpoint/x.py"))
  assert not f.filter(rec("absl", logging.DEBUG, "/v/site-packages/grain/_src/x.py"))
  assert f.filter(rec("absl", logging.WARNING, "/v/site-packages/orbax/checkpoint/x.py"))
  assert f.filter(rec("absl", logging.INFO, "/repo/d2g_jax/data/pairs.py"))
  assert not f.filter(rec("jax._src.xla_bridge", logging.INFO, "/v/jax/_src/xla_bridge.py"))
  assert f.filter(rec("jax._src.xla_bridge", logging.ERROR, "/v/jax/_src/xla_bridge.py"))
  assert f.filter(rec("jax._src.compiler", logging.INFO, "/v/jax/_src/compiler.py"))
