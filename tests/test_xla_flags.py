"""d2g_jax turns off XLA:CPU's YNNPACK fusions at import, without overriding the user."""

import os
import subprocess
import sys

import jax
import pytest

from d2g_jax import _xla_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


@pytest.fixture
def fresh_process(monkeypatch):
  """`apply` as it runs at import in a fresh process, before any JAX backend starts.

  In the full suite earlier tests have started JAX already, which `apply` detects (see
  the warning test below), so the pure environment logic is tested with that check off.
  """
  monkeypatch.setattr(_xla_flags, "_backends_started", lambda: False)


def test_apply_adds_flag_and_keeps_existing_flags(fresh_process):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert _xla_flags.apply(env) == [f"{FLAG}="]
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}="
  assert _xla_flags.apply(env) == []  # idempotent
  assert env["XLA_FLAGS"].count(FLAG) == 1


def test_apply_never_overrides_the_user_and_has_an_opt_out(fresh_process):
  env = {"XLA_FLAGS": f"{FLAG}=dot"}
  assert _xla_flags.apply(env) == [] and env["XLA_FLAGS"] == f"{FLAG}=dot"
  env = {_xla_flags.OPT_OUT_ENV: "1"}
  assert _xla_flags.apply(env) == [] and "XLA_FLAGS" not in env
  env = {}
  assert _xla_flags.apply(env) == [f"{FLAG}="] and env["XLA_FLAGS"] == f"{FLAG}="


def test_apply_warns_once_jax_has_started():
  jax.devices()  # make sure this process's backends are up
  with pytest.warns(UserWarning, match="after JAX started its backends"):
    assert _xla_flags.apply({}) == []


def test_this_process_runs_with_the_flag():
  """conftest imports d2g_jax before JAX starts, as main and the benchmarks do."""
  assert f"{FLAG}=" in os.environ["XLA_FLAGS"].split()


def _dot_hlo(env_extra: dict) -> str:
  code = ("import d2g_jax, jax, jax.numpy as jnp\n"
          "x = jnp.ones((256, 256))\n"
          "print(jax.jit(lambda a: a @ a).lower(x).compile().as_text())\n")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _xla_flags.OPT_OUT_ENV)}
  env.update(JAX_PLATFORMS="cpu", **env_extra)
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        check=True).stdout


def test_compiled_dot_skips_ynnpack_unless_the_user_opts_out():
  assert "ynn" not in _dot_hlo({}).lower()
  # The control: jaxlib's default really does route this dot through YNNPACK, so the
  # assertion above tests our flag and not a jaxlib that has dropped YNNPACK.
  assert "ynn" in _dot_hlo({_xla_flags.OPT_OUT_ENV: "1"}).lower()
