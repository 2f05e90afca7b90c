"""Training checkpoints: a train-state pytree and the grain iterator, saved together.

    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      if (step := ckpt.latest_step()) is not None:
        state = ckpt.restore(step, abstract_state, data_iterator=it)  # `it` restored in place
      ...
      ckpt.save(step, state, data_iterator=it)                        # async; returns at once

Layout (Orbax CheckpointManager, step-numbered folders straight under `directory`):
    <directory>/<step>/state    the state pytree (OCDBT; each host writes its own shards)
    <directory>/<step>/data     grain iterator state, one JSON file per host (optional)
    <directory>/<step>/config   a JSON dict, e.g. the run's config (optional)
`directory` may be a local (shared) path or a cloud URL Orbax supports (gs://...).

Orbax writes a step to `<step>.orbax-checkpoint-tmp` and renames it when every item and
host is done, so a step folder is always complete: a save killed half-way leaves only the
temporary folder, which `latest_step()` ignores and the next Checkpointer deletes. At most
`max_to_keep` complete steps are kept (oldest deleted first).

`restore` takes an abstract target: `jax.ShapeDtypeStruct`s carrying the shardings the
state should have (from `jax.eval_shape` + the sharding rules, or `abstract_like(state)`),
so each host reads only its shards and a state larger than one device never sits whole
on one device. The target may be sharded differently from the saved state.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from d2g_jax.log import get_logger

_log = get_logger(__name__)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of jax arrays: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _check_abstract(abstract_state: Any):
  leaves, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
  bad = [jax.tree_util.keystr(p) for p, x in leaves
         if not isinstance(x, jax.ShapeDtypeStruct) or x.sharding is None]
  if bad:
    raise ValueError(
        f"restore needs every leaf of abstract_state to be a jax.ShapeDtypeStruct with a "
        f"sharding (so each array goes straight into its shards); these are not: "
        f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}. Build it with "
        f"jax.ShapeDtypeStruct(shape, dtype, sharding=...) or checkpoint.abstract_like(state).")


class Checkpointer:
  """Saves and restores {state, grain iterator, config} per step; see the module docstring.

  Every process of a multi-host run must call save / restore / wait / close together.
  """

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    directory = os.fspath(directory)  # a local path, or a cloud URL such as gs://bucket/run
    self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    """Complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None = None, *,
           config: dict | None = None, force: bool = False) -> bool:
    """Starts saving `step` (in the background when async) and returns True.

    The state's arrays are copied to host memory before this returns, so the caller may
    donate or delete them at once; the iterator's position is read now, too. A step that
    is already saved is kept and False returned, unless `force` (then it is rewritten).
    """
    step = int(step)
    if step in self._manager.all_steps():
      if not force:
        return False
      self._manager.wait_until_finished()
      self._manager.delete(step)
    args = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      args["config"] = ocp.args.JsonSave(config)
    _log.info("saving checkpoint %d to %s", step, self.directory)
    # force=True: we decide when to save; Orbax's own policy would skip a step while the
    # previous save is still writing. Orbax waits for that save to finish first.
    return self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def _step_dir(self, step: int) -> epath.Path:
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no complete checkpoint for step {step} in {self.directory}; "
                              f"complete steps: {self.all_steps() or 'none'}")
    return self.directory / str(step)

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator | None = None) -> Any:
    """The state of `step`, placed per `abstract_state`'s shardings; the iterator (if
    given) is moved to where it was at that step, in place."""
    step = int(step)
    _check_abstract(abstract_state)
    folder = self._step_dir(step)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      if not (folder / "data").is_dir():
        raise FileNotFoundError(f"checkpoint {folder} has no data iterator state ('data' "
                                f"folder); it was saved without data_iterator")
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {folder} does not fit the state this run builds: {e}\nWas it written "
          f"with another model or optimiser config? Use a new workdir for a new config.") from e
    _log.info("restored checkpoint %d from %s", step, self.directory)
    return restored["state"]

  def restore_partial(self, step: int, abstract_subtree: Any) -> Any:
    """Only the leaves of `abstract_subtree` (a sub-pytree of the saved state, e.g.
    {"g_ema": ...}), placed per its shardings; the rest is never read (export reads the
    generator's EMA without the discriminator and optimiser states)."""
    _check_abstract(abstract_subtree)
    folder = self._step_dir(int(step)) / "state"
    args = ocp.args.PyTreeRestore(
        abstract_subtree, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract_subtree), partial_restore=True)
    try:
      with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(folder, args=args)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"checkpoint {folder} has no {sorted(abstract_subtree)} of the expected "
                       f"shapes: {e}") from e

  def config(self, step: int) -> dict | None:
    """The config dict saved with `step`, or None if none was saved."""
    if not (self._step_dir(step) / "config").is_dir():
      return None
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def wait(self):
    """Blocks until the last save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
