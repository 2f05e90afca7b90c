"""What we compile for: a TPU topology's abstract devices (no TPU needed), or this host's CPUs.

    devices = target.devices("v5p:4x4x4")          # 64 compile-only TPU v5p devices
    mesh = parallel.make_mesh({"data": 8, "fsdp": 8}, devices)
    chip = target.chip("v5p:4x4x4")                # HBM bytes, bf16 peak, HBM bandwidth

TPU topologies need the TPU runtime library (`pip install -e '.[tpu]'`, i.e.
`libtpu==0.0.42.*` for jax 0.10.2); `jax.experimental.topologies.get_topology_desc`
then describes the devices of a slice for XLA's TPU compiler without any TPU attached
(MaxText's `train_compile.py` does the same). "cpu" / "cpu:N" are this host's (fake)
CPU devices, for tests and for comparing programs without libtpu.
"""

from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's public figures (per chip, dense bf16)."""
  name: str
  hbm_bytes: float
  bf16_flops: float        # peak FLOP/s
  hbm_bytes_per_s: float
  source: str


# Google Cloud TPU documentation, "System architecture" tables of each version's page.
CHIPS = {
    "v5p": Chip("TPU v5p", 95e9, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v5e": Chip("TPU v5e", 16e9, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v4": Chip("TPU v4", 32e9, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v6e": Chip("TPU v6e", 32e9, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}
TPU_EXTRA = "pip install -e '.[tpu]' (libtpu==0.0.42.*, the TPU runtime matching jax 0.10.2)"


def is_cpu(topology: str) -> bool:
  return topology == "cpu" or topology.startswith("cpu:")


def platform(topology: str) -> str:
  return "cpu" if is_cpu(topology) else "tpu"


def chip(topology: str) -> Chip | None:
  """The chip of a TPU topology name ("v5p:4x4x4" -> v5p); None for CPUs or unknown chips."""
  return None if is_cpu(topology) else CHIPS.get(topology.split(":")[0].split("-")[0])


def devices(topology: str) -> list:
  """Compile targets: "v5p:4x4x4" (TPU generation:topology, as libtpu names it), or "cpu[:N]"."""
  if is_cpu(topology):
    cpus = jax.devices("cpu")
    n = int(topology.split(":")[1]) if ":" in topology else len(cpus)
    if n > len(cpus):
      raise ValueError(f"topology {topology!r}: only {len(cpus)} CPU devices here (set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts)")
    return cpus[:n]
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    raise RuntimeError(f"compiling for TPU topology {topology!r} needs the TPU runtime "
                       f"library, which is not installed: {TPU_EXTRA}") from e
  # Other processes on this host may have loaded libtpu (any JAX program does when it is
  # installed); compile-only use needs no exclusive hold on a TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental.topologies import get_topology_desc
  try:
    return list(get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # libtpu's own message names the problem
    raise ValueError(f"TPU topology {topology!r} was refused by libtpu ({e}); names look like "
                     "'v5p:2x2x1', 'v5p:4x4x4', 'v5e:2x2', 'v4:2x2x2'") from e


def parse_axes(spec: str) -> dict[str, int]:
  """'data=8,fsdp=8' -> {'data': 8, 'fsdp': 8} (one size may be -1)."""
  axes = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, size = part.partition("=")
    if not size.lstrip("-").isdigit():
      raise ValueError(f"mesh spec {spec!r}: expected name=size[,name=size], e.g. data=8,fsdp=8")
    axes[name.strip()] = int(size)
  return axes
