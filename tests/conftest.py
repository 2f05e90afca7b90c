"""Test setup: CPU, 8 fake devices for sharding tests, fast compiles for tiny models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import d2g_jax  # noqa: E402,F401  (sets its XLA flags before JAX starts, as in real use)

import jax  # noqa: E402

# Tiny models: compile time dominates, so skip most XLA optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: full-size checks (minutes, GBs of RAM); run with `pytest -m slow`")
