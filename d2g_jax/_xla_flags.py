"""XLA flags this package sets before JAX starts its backends.

jaxlib 0.10 sends CPU matmuls and convolutions through YNNPACK fusions by default. On
the x86 CPUs we measured (AVX2, fp32) that path runs the SD UNet's GEMMs at about half
the speed of XLA's own Eigen kernels and its 3x3 convolutions about 1.7x slower, so the
whole UNet forward is ~1.5x slower (docs/performance.md, "Where the CPU time goes"). The flag below
turns the YNNPACK fusions off and leaves every other backend (GPU, TPU) untouched.

Rules: a flag the user already put in XLA_FLAGS is never overridden;
`D2G_JAX_KEEP_XLA_DEFAULTS=1` skips this altogether; XLA reads XLA_FLAGS once, when the
first backend starts, so if JAX is already running when d2g_jax is imported we warn
instead of pretending.
"""

from __future__ import annotations

import os
import sys
import warnings

# (flag, value): `--xla_cpu_experimental_ynn_fusion_type=` with an empty value disables
# every YNNPACK fusion kind (dot, convolution, elementwise) on the CPU backend.
CPU_FLAGS = (("--xla_cpu_experimental_ynn_fusion_type", ""),)
OPT_OUT_ENV = "D2G_JAX_KEEP_XLA_DEFAULTS"


def _backends_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # private API moved: assume not started
    return False


def apply(environ=os.environ) -> list[str]:
  """Adds our CPU flags to `environ["XLA_FLAGS"]`; returns the flags it added."""
  if environ.get(OPT_OUT_ENV, "") not in ("", "0"):
    return []
  current = environ.get("XLA_FLAGS", "")
  present = {tok.split("=", 1)[0] for tok in current.split()}
  added = [f"{name}={value}" for name, value in CPU_FLAGS if name not in present]
  if not added:
    return []
  if _backends_started():
    warnings.warn(
        "d2g_jax was imported after JAX started its backends, so XLA cannot pick up "
        f"{' '.join(added)} (CPU UNet ~1.5x slower). Import d2g_jax before the first JAX "
        f"computation, or set {OPT_OUT_ENV}=1 to silence this.", stacklevel=3)
    return []
  environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
