"""What we compile for: a TPU topology's or a GPU cluster's abstract devices (no accelerator
needed), or this host's CPUs.

    devices = target.devices("v5p:4x4x4")          # 64 compile-only TPU v5p devices
    mesh = parallel.make_mesh({"data": 8, "fsdp": 8}, devices)
    chip = target.chip("v5p:4x4x4")                # HBM bytes, bf16 peak, HBM bandwidth

TPU topologies need the TPU runtime library (`pip install -e '.[tpu]'`, i.e.
`libtpu==0.0.42.*` for jax 0.10.2); `jax.experimental.topologies.get_topology_desc`
then describes the devices of a slice for XLA's TPU compiler without any TPU attached
(MaxText's `train_compile.py` does the same). GPU targets ("h100:8" = one host of 8,
"h100:4x8" = 4 hosts of 8) need JAX's CUDA plugin (`pip install 'jax[cuda13]==0.10.2'`);
the plugin builds a compile-only topology from a `GpuTargetConfigProto` (the GPU's
device description) instead of a GPU. "cpu" / "cpu:N" are this host's (fake) CPU
devices, for tests and for comparing programs without libtpu.
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
  compiler_checks_memory: bool = True  # XLA's TPU compiler refuses programs that do not fit


# Google Cloud TPU documentation, "System architecture" tables of each version's page.
CHIPS = {
    "v5p": Chip("TPU v5p", 95e9, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v5e": Chip("TPU v5e", 16e9, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v4": Chip("TPU v4", 32e9, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v6e": Chip("TPU v6e", 32e9, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}
TPU_EXTRA = "pip install -e '.[tpu]' (libtpu==0.0.42.*, the TPU runtime matching jax 0.10.2)"
GPU_EXTRA = "pip install 'jax[cuda13]==0.10.2' (JAX's CUDA plugin, the same version as jaxlib)"

# The H100 SXM's device description as XLA's GPU compiler reads it (values from XLA's
# xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb, Apache-2.0); the cuDNN version is the one
# the installed CUDA plugin was built against.
H100_SXM = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: %d minor: %d patch: %d }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPUS = {"h100": (H100_SXM, Chip("NVIDIA H100 SXM", 80e9, 989e12, 3.35e12,
                                "https://www.nvidia.com/en-us/data-center/h100/",
                                compiler_checks_memory=False))}


def is_cpu(topology: str) -> bool:
  return topology == "cpu" or topology.startswith("cpu:")


def _kind(topology: str) -> str:
  return topology.split(":")[0].split("-")[0]


def platform(topology: str) -> str:
  if is_cpu(topology):
    return "cpu"
  return "gpu" if _kind(topology) in GPUS else "tpu"


def chip(topology: str) -> Chip | None:
  """The chip of a topology name ("v5p:4x4x4" -> v5p); None for CPUs or unknown chips."""
  if is_cpu(topology):
    return None
  kind = _kind(topology)
  return GPUS[kind][1] if kind in GPUS else CHIPS.get(kind)


def _gpu_devices(topology: str) -> list:
  spec, _ = GPUS[_kind(topology)]
  shape = topology.partition(":")[2] or "1"
  dims = [int(d) for d in shape.split("x") if d.isdigit()]
  if not dims or len(dims) > 2 or len(dims) != len(shape.split("x")):
    raise ValueError(f"GPU topology {topology!r}: expected <gpu>:<gpus> or "
                     "<gpu>:<hosts>x<gpus per host>, e.g. h100:8 or h100:4x8")
  hosts, per_host = (1, dims[0]) if len(dims) == 1 else dims
  versions = None
  for pkg in ("jax_cuda13_plugin", "jax_cuda12_plugin"):
    try:
      versions = __import__(f"{pkg}._versions", fromlist=["_versions"])
      break
    except ImportError:
      continue
  if versions is None:
    raise RuntimeError(f"compiling for GPU topology {topology!r} needs JAX's CUDA plugin, "
                       f"which is not installed: {GPU_EXTRA}")
  v = versions.cudnn_build_version()  # e.g. 91000 = 9.10.0
  from jax.experimental.topologies import get_topology_desc
  return list(get_topology_desc(platform="cuda", topology_name="",
                                topology=f"1x{hosts}x{per_host}",
                                target_config=spec % (v // 10000, v // 100 % 100, v % 100)
                                ).devices)


def devices(topology: str) -> list:
  """Compile targets: "v5p:4x4x4" (TPU generation:topology, as libtpu names it), or "cpu[:N]"."""
  if is_cpu(topology):
    cpus = jax.devices("cpu")
    n = int(topology.split(":")[1]) if ":" in topology else len(cpus)
    if n > len(cpus):
      raise ValueError(f"topology {topology!r}: only {len(cpus)} CPU devices here (set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts)")
    return cpus[:n]
  if platform(topology) == "gpu":
    return _gpu_devices(topology)
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
