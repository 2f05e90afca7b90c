"""Test setup: CPU, 8 fake devices for sharding tests, fast compiles for tiny models."""

import os
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import d2g_jax  # noqa: E402,F401  (sets its XLA flags before JAX starts, as in real use)

# Tiny models: compile time dominates, so skip most XLA optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_default_matmul_precision", "highest")
# XLA's persistent compilation cache, shared by this session's tests and their subprocesses
# (which pass XLA_CACHE on): the same train step compiled by two tests is compiled once.
XLA_CACHE = os.environ.setdefault("D2G_TEST_XLA_CACHE", tempfile.mkdtemp(prefix="d2g_xla_"))
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: full-size checks (minutes, GBs of RAM); run with `pytest -m slow`")


@pytest.fixture(scope="session", autouse=True)
def no_unresolved_paths():
  """A stage given a config that `run.resolve` never saw would write to a folder literally
  named '{workdir}' under the current directory: fail the session if one appears."""
  stray = os.path.join(os.getcwd(), "{workdir}")
  existed = os.path.exists(stray)
  yield
  assert existed or not os.path.exists(stray), (
      f"a test ran a stage on an unresolved config: {stray} was written; pass the config "
      "through d2g_jax.run.resolve first")
