"""Flax params + their model config in one Orbax checkpoint folder.

Layout (an Orbax composite checkpoint, written atomically by Orbax):
    <dir>/params   the Flax param tree (StandardCheckpointHandler)
    <dir>/config   {"component": "unet", "config": <diffusers config.json dict>}
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _handler():
  return ocp.CompositeCheckpointHandler(
      params=ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1),
      config=ocp.JsonCheckpointHandler())


def save(path: str, params: Any, component: str, config: dict, overwrite: bool = False):
  path = os.path.abspath(path)
  if os.path.exists(path):
    if not overwrite:
      raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
  # Bound the bytes in flight so saving does not hold a second copy of the weights
  # (pass jax arrays: numpy leaves are copied whole before writing).
  ckptr = ocp.Checkpointer(_handler())
  ckptr.save(path, ocp.args.Composite(
      params=ocp.args.PyTreeSave(params),
      config=ocp.args.JsonSave({"component": component, "config": config})), force=overwrite)


def load(path: str, abstract_params: Any | None = None) -> tuple[Any, str, dict]:
  """(params, component, config). `abstract_params` (ShapeDtypeStructs, maybe sharded)
  restores straight onto devices; without it the params come back as numpy arrays."""
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, "params")) or not os.path.isdir(
      os.path.join(path, "config")):
    raise FileNotFoundError(
        f"{path} is not a d2g_jax Orbax checkpoint (expected sub-folders 'params' and 'config', "
        "as written by `python -m d2g_jax.convert to-orbax`)")
  ckptr = ocp.Checkpointer(_handler())
  if abstract_params is None:  # host numpy arrays, whatever topology wrote the checkpoint
    tree = ckptr.metadata(path).item_metadata["params"].tree
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  else:
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
  restore = ocp.args.PyTreeRestore(item=abstract_params, restore_args=restore_args)
  out = ckptr.restore(path, ocp.args.Composite(params=restore, config=ocp.args.JsonRestore()))
  meta = out["config"]
  return out["params"], meta["component"], meta["config"]
